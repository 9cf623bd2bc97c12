"""emailrelay: a transactional email relay (NATS request/reply in, SMTP out)."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("emailrelay")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0.0.0"
