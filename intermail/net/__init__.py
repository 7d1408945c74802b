"""Network plumbing shared by every server kind, knowing no mail protocol.

``runner``: the process skeleton (listeners, signals, drain, ready file).
``pump``: the asyncio driver for any sans-I/O machine in :mod:`intermail.proto`.
"""
