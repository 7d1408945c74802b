"""intermail: a highly available mail platform (MTA, IMAP/POP3 access, directory, message stores)."""

__version__ = "0.1.0"
