"""Operator tooling: the ``intermail`` command line and the verbs it dispatches to.

:mod:`intermail.admin.cli` owns the parser and the table of verb modules;
each verb lives in its own module here and registers itself.
"""
