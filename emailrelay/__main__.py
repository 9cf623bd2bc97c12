import sys

from emailrelay.cli import main

sys.exit(main())
