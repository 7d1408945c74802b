"""IMAP client commands: one frozen dataclass per command, and the parser for each.

Owns the command layer of RFC 9051 (IMAP4rev2) and RFC 3501 (IMAP4rev1)
with the extensions the access server speaks: IDLE (RFC 2177), UIDPLUS
(RFC 4315: UID EXPUNGE), MOVE (RFC 6851), CONDSTORE (RFC 7162: SELECT
(CONDSTORE), FETCH (CHANGEDSINCE), STORE (UNCHANGEDSINCE), SEARCH MODSEQ),
ENABLE (RFC 5161), ID (RFC 2971), NAMESPACE (RFC 2342), UNSELECT (RFC
3691), LIST-EXTENDED (RFC 5258) with SPECIAL-USE (RFC 6154) and
LIST-STATUS (RFC 5819), ESEARCH return options (RFC 4731, SAVE of RFC
5182), MULTIAPPEND (RFC 3502), BINARY APPEND (RFC 3516), SASL-IR (RFC
4959).  :func:`parse_command` turns a command's lines and literals into
``(tag, command)``; the tokens come from :mod:`.grammar`, whose generator
protocol for literals this module follows.

Each dataclass says in which session states it is valid (``STATES``, RFC
9051 §6) and its wire name (``name``); the session, not the parser, checks
the state.  Each parser sits under the ABNF it implements.

Invariants: :func:`parse_command` returns, yields a LiteralSpec, or raises
``GrammarError`` with the tag once it was read -- whatever the input.

Logs: nothing.
"""

from __future__ import annotations

import dataclasses
import datetime
from collections.abc import Callable, Generator
from typing import Any, ClassVar

from intermail.proto.imap.grammar import (
    DEFAULT_MAX_DEPTH,
    SEARCH_RETURN_OPTIONS,
    SPECIAL_USE_ATTRIBUTES,
    FetchAttribute,
    GrammarError,
    LiteralSpec,
    Parse,
    Reader,
    SearchKey,
    SequenceSet,
)

__all__ = [
    "NOT_AUTHENTICATED", "AUTHENTICATED", "SELECTED", "ANY_STATE",
    "Capability", "Noop", "Logout", "StartTls", "Authenticate", "Login", "Enable", "Select", "Examine",
    "Create", "Delete", "Rename", "Subscribe", "Unsubscribe", "List", "Lsub", "Namespace", "Status",
    "AppendMessage", "Append", "Idle", "Check", "Close", "Unselect", "Expunge", "Search", "Fetch", "Store",
    "Copy", "Move", "Id", "COMMANDS", "parse_command", "decode_plain",
]  # fmt: skip

NOT_AUTHENTICATED = "not authenticated"
AUTHENTICATED = "authenticated"
SELECTED = "selected"
ANY_STATE = frozenset({NOT_AUTHENTICATED, AUTHENTICATED, SELECTED})
_AUTH_OR_SELECTED = frozenset({AUTHENTICATED, SELECTED})
_NOT_AUTH = frozenset({NOT_AUTHENTICATED})
_SELECTED = frozenset({SELECTED})


class _Command:
    NAME: ClassVar[str]
    STATES: ClassVar[frozenset[str]]

    @property
    def name(self) -> str:
        """The command as the client names it: ``FETCH``, ``UID FETCH``..."""
        return f"UID {self.NAME}" if getattr(self, "uid", False) else self.NAME


# ---------------------------------------------------------------------------
# Any state (RFC 9051 §6.1)


@dataclasses.dataclass(frozen=True)
class Capability(_Command):
    NAME = "CAPABILITY"
    STATES = ANY_STATE


@dataclasses.dataclass(frozen=True)
class Noop(_Command):
    NAME = "NOOP"
    STATES = ANY_STATE


@dataclasses.dataclass(frozen=True)
class Logout(_Command):
    NAME = "LOGOUT"
    STATES = ANY_STATE


@dataclasses.dataclass(frozen=True)
class Id(_Command):
    """``ID`` (RFC 2971): the client's field/value pairs, or None for ``ID NIL``."""

    NAME = "ID"
    STATES = ANY_STATE
    parameters: tuple[tuple[str, str | None], ...] | None = None


# ---------------------------------------------------------------------------
# Not authenticated (RFC 9051 §6.2)


@dataclasses.dataclass(frozen=True)
class StartTls(_Command):
    NAME = "STARTTLS"
    STATES = _NOT_AUTH


@dataclasses.dataclass(frozen=True)
class Authenticate(_Command):
    """``AUTHENTICATE mechanism [initial-response]``.

    ``mechanism`` upper-case; ``initial_response`` is the decoded SASL-IR
    (RFC 4959; ``=`` is ``b""``), None when the client sent none.  The
    exchange goes on with :class:`~.server.Continuation` /
    :class:`~.server.AuthResponse` (see :mod:`.server`).
    """

    NAME = "AUTHENTICATE"
    STATES = _NOT_AUTH
    mechanism: str
    initial_response: bytes | None = None


@dataclasses.dataclass(frozen=True)
class Login(_Command):
    NAME = "LOGIN"
    STATES = _NOT_AUTH
    username: str
    password: str


# ---------------------------------------------------------------------------
# Authenticated (RFC 9051 §6.3)


@dataclasses.dataclass(frozen=True)
class Enable(_Command):
    """``ENABLE cap...`` (RFC 5161), capability names as written."""

    NAME = "ENABLE"
    STATES = frozenset({AUTHENTICATED})
    capabilities: tuple[str, ...]


@dataclasses.dataclass(frozen=True)
class Select(_Command):
    NAME = "SELECT"
    STATES = _AUTH_OR_SELECTED
    mailbox: str
    condstore: bool = False  # select-param CONDSTORE (RFC 7162)


@dataclasses.dataclass(frozen=True)
class Examine(_Command):
    NAME = "EXAMINE"
    STATES = _AUTH_OR_SELECTED
    mailbox: str
    condstore: bool = False


@dataclasses.dataclass(frozen=True)
class Create(_Command):
    """``CREATE name [(USE (\\Sent ...))]`` (RFC 6154 §3 CREATE-SPECIAL-USE)."""

    NAME = "CREATE"
    STATES = _AUTH_OR_SELECTED
    mailbox: str
    special_use: tuple[str, ...] = ()


@dataclasses.dataclass(frozen=True)
class Delete(_Command):
    NAME = "DELETE"
    STATES = _AUTH_OR_SELECTED
    mailbox: str


@dataclasses.dataclass(frozen=True)
class Rename(_Command):
    NAME = "RENAME"
    STATES = _AUTH_OR_SELECTED
    mailbox: str
    new_name: str


@dataclasses.dataclass(frozen=True)
class Subscribe(_Command):
    NAME = "SUBSCRIBE"
    STATES = _AUTH_OR_SELECTED
    mailbox: str


@dataclasses.dataclass(frozen=True)
class Unsubscribe(_Command):
    NAME = "UNSUBSCRIBE"
    STATES = _AUTH_OR_SELECTED
    mailbox: str


@dataclasses.dataclass(frozen=True)
class List(_Command):
    """``LIST [(selection)] reference pattern-or-patterns [RETURN (options)]`` (RFC 5258).

    ``selection`` and ``returns`` are upper-case option names;
    ``status_items`` are the items of ``RETURN (STATUS (...))`` (RFC 5819),
    None without it.  ``extended`` is True when the client used any
    LIST-EXTENDED syntax, so the app may answer with extended data.
    """

    NAME = "LIST"
    STATES = _AUTH_OR_SELECTED
    reference: str
    patterns: tuple[str, ...]
    selection: tuple[str, ...] = ()
    returns: tuple[str, ...] = ()
    status_items: tuple[str, ...] | None = None
    extended: bool = False


@dataclasses.dataclass(frozen=True)
class Lsub(_Command):
    NAME = "LSUB"
    STATES = _AUTH_OR_SELECTED
    reference: str
    pattern: str


@dataclasses.dataclass(frozen=True)
class Namespace(_Command):
    NAME = "NAMESPACE"
    STATES = _AUTH_OR_SELECTED


@dataclasses.dataclass(frozen=True)
class Status(_Command):
    NAME = "STATUS"
    STATES = _AUTH_OR_SELECTED
    mailbox: str
    items: tuple[str, ...]


@dataclasses.dataclass(frozen=True)
class AppendMessage:
    """One message of an APPEND: its octets, and the optional flags and internal date."""

    data: bytes
    flags: tuple[str, ...] = ()
    internal_date: datetime.datetime | None = None
    binary: bool = False  # sent as literal8 (RFC 3516)


@dataclasses.dataclass(frozen=True)
class Append(_Command):
    """``APPEND mailbox [flags] [date-time] literal`` -- more than one message is MULTIAPPEND (RFC 3502)."""

    NAME = "APPEND"
    STATES = _AUTH_OR_SELECTED
    mailbox: str
    messages: tuple[AppendMessage, ...]


@dataclasses.dataclass(frozen=True)
class Idle(_Command):
    """``IDLE`` (RFC 2177): the app accepts with a Continuation; the client ends it with DONE."""

    NAME = "IDLE"
    STATES = _AUTH_OR_SELECTED


# ---------------------------------------------------------------------------
# Selected (RFC 9051 §6.4)


@dataclasses.dataclass(frozen=True)
class Check(_Command):
    NAME = "CHECK"
    STATES = _SELECTED


@dataclasses.dataclass(frozen=True)
class Close(_Command):
    NAME = "CLOSE"
    STATES = _SELECTED


@dataclasses.dataclass(frozen=True)
class Unselect(_Command):
    NAME = "UNSELECT"
    STATES = _SELECTED


@dataclasses.dataclass(frozen=True)
class Expunge(_Command):
    """``EXPUNGE``, or ``UID EXPUNGE uids`` (RFC 4315 §2.1) when ``uids`` is set."""

    NAME = "EXPUNGE"
    STATES = _SELECTED
    uids: SequenceSet | None = None

    @property
    def name(self) -> str:
        return "UID EXPUNGE" if self.uids is not None else "EXPUNGE"


@dataclasses.dataclass(frozen=True)
class Search(_Command):
    """``[UID] SEARCH [RETURN (opts)] [CHARSET cs] keys...``.

    ``criteria`` are the top-level keys (all must match); ``returns`` the
    upper-case ESEARCH return options (RFC 4731; ``()`` is ``RETURN ()``),
    None without RETURN (then the answer is a plain SEARCH response).
    Strings in the keys are decoded as :meth:`.grammar.Reader.search_text` says.
    """

    NAME = "SEARCH"
    STATES = _SELECTED
    criteria: tuple[SearchKey, ...]
    charset: str | None = None
    returns: tuple[str, ...] | None = None
    uid: bool = False


@dataclasses.dataclass(frozen=True)
class Fetch(_Command):
    """``[UID] FETCH set items [(CHANGEDSINCE n)]``; macros are expanded into ``attributes``."""

    NAME = "FETCH"
    STATES = _SELECTED
    sequence_set: SequenceSet
    attributes: tuple[FetchAttribute, ...]
    uid: bool = False
    changed_since: int | None = None


REPLACE, ADD, REMOVE = "replace", "add", "remove"


@dataclasses.dataclass(frozen=True)
class Store(_Command):
    """``[UID] STORE set [(UNCHANGEDSINCE n)] [+|-]FLAGS[.SILENT] flags``.

    ``mode`` is ``"replace"`` (FLAGS), ``"add"`` (+FLAGS) or ``"remove"`` (-FLAGS).
    """

    NAME = "STORE"
    STATES = _SELECTED
    sequence_set: SequenceSet
    mode: str
    flags: tuple[str, ...]
    silent: bool = False
    uid: bool = False
    unchanged_since: int | None = None


@dataclasses.dataclass(frozen=True)
class Copy(_Command):
    NAME = "COPY"
    STATES = _SELECTED
    sequence_set: SequenceSet
    mailbox: str
    uid: bool = False


@dataclasses.dataclass(frozen=True)
class Move(_Command):
    NAME = "MOVE"
    STATES = _SELECTED
    sequence_set: SequenceSet
    mailbox: str
    uid: bool = False


# ---------------------------------------------------------------------------
# Parsers, one per command.  A parser starts after the command name and
# must leave the reader at the end of the command (parse_command checks).


def _no_arguments(cls: type) -> Callable[[Reader], object]:
    def parse(reader: Reader) -> object:
        return cls()

    return parse


# id = "ID" SP id-params-list
# id-params-list = "(" #(string SP nstring) ")" / nil      (RFC 2971 §4)
def _id(r: Reader) -> Parse[Id]:
    r.sp()
    if r.try_word("NIL"):
        return Id(None)
    r.open_paren('"(" or NIL')
    pairs = []
    while r.peek() != 0x29:
        if pairs:
            r.sp()
        field = r.text((yield from r.string()), "ID field")
        r.sp()
        value = yield from r.nstring()
        pairs.append((field, None if value is None else r.text(value, "ID value")))
    r.close_paren()
    return Id(tuple(pairs))


# authenticate = "AUTHENTICATE" SP auth-type [SP initial-resp]
# initial-resp = (base64 / "=")                              (RFC 9051 §9, RFC 4959)
def _authenticate(r: Reader) -> Authenticate:
    r.sp()
    mechanism = r.atom("a SASL mechanism").upper()
    initial = None
    if not r.at_end():
        r.sp()
        initial = r.base64()
    return Authenticate(mechanism, initial)


# login = "LOGIN" SP userid SP password; userid = astring; password = astring
def _login(r: Reader) -> Parse[Login]:
    r.sp()
    user = r.text((yield from r.astring()), "user name")
    r.sp()
    password = r.text((yield from r.astring()), "password")
    return Login(user, password)


# enable = "ENABLE" 1*(SP capability); capability = atom   (RFC 5161 §4)
def _enable(r: Reader) -> Enable:
    capabilities = []
    while True:
        r.sp()
        capabilities.append(r.atom("a capability"))
        if r.at_end():
            return Enable(tuple(capabilities))


# select = "SELECT" SP mailbox [select-params]
# select-params = SP "(" select-param *(SP select-param) ")"      (RFC 4466 §2.1)
# select-param =/ "CONDSTORE"                                     (RFC 7162 §7)
def _select_args(r: Reader) -> Parse[tuple[str, bool]]:
    r.sp()
    mailbox = yield from r.mailbox()
    condstore = False
    if not r.at_end():
        r.sp()
        for param in r.paren_words("select parameters", allow_empty=False):
            if param != "CONDSTORE":
                raise r.error(f"unsupported select parameter {param}")
            condstore = True
    return mailbox, condstore


def _select(r: Reader) -> Parse[Select]:
    return Select(*(yield from _select_args(r)))


def _examine(r: Reader) -> Parse[Examine]:
    return Examine(*(yield from _select_args(r)))


# create = "CREATE" SP mailbox [create-params]
# create-params = SP "(" create-param *(SP create-param) ")"       (RFC 4466 §2.2)
# create-param =/ "USE" SP "(" [use-attr *(SP use-attr)] ")"      (RFC 6154 §6)
def _create(r: Reader) -> Parse[Create]:
    r.sp()
    mailbox = yield from r.mailbox()
    uses: list[str] = []
    if not r.at_end():
        r.sp()
        r.open_paren("create parameters")
        while True:
            if r.word("a create parameter") != "USE":
                raise r.error("unsupported create parameter")
            r.sp()
            for attribute in r.flag_list():
                if not attribute.startswith("\\"):
                    raise r.error("a special-use attribute starts with a backslash")
                uses.append(SPECIAL_USE_ATTRIBUTES.get(attribute.lower(), attribute))
            if r.peek() != 0x20:
                break
            r.pos += 1
        r.close_paren()
    return Create(mailbox, tuple(uses))


def _one_mailbox(cls: type) -> Callable[[Reader], Parse[Any]]:
    def parse(r: Reader) -> Parse[Any]:
        r.sp()
        return cls((yield from r.mailbox()))

    return parse


# rename = "RENAME" SP mailbox SP mailbox
def _rename(r: Reader) -> Parse[Rename]:
    r.sp()
    old = yield from r.mailbox()
    r.sp()
    return Rename(old, (yield from r.mailbox()))


_LIST_SELECT_OPTIONS = frozenset({"SUBSCRIBED", "REMOTE", "RECURSIVEMATCH", "SPECIAL-USE"})
_LIST_RETURN_OPTIONS = frozenset({"SUBSCRIBED", "CHILDREN", "SPECIAL-USE", "STATUS"})


# list = "LIST" [SP list-select-opts] SP mailbox SP mbox-or-pat [SP list-return-opts]   (RFC 5258 §6)
# list-select-opts = "(" [list-select-opt *(SP list-select-opt)] ")"
# mbox-or-pat = list-mailbox / patterns; patterns = "(" list-mailbox *(SP list-mailbox) ")"
# list-return-opts = "RETURN" SP "(" [return-option *(SP return-option)] ")"
# return-option =/ "STATUS" SP "(" status-att *(SP status-att) ")"                      (RFC 5819 §6)
def _list(r: Reader) -> Parse[List]:
    r.sp()
    extended = False
    selection: tuple[str, ...] = ()
    if r.peek() == 0x28:
        extended = True
        selection = r.paren_words("selection options")
        for option in selection:
            if option not in _LIST_SELECT_OPTIONS:
                raise r.error(f"unsupported selection option {option}")
        # RFC 5258 §3.1: RECURSIVEMATCH only with another (base) option.
        if "RECURSIVEMATCH" in selection and "SUBSCRIBED" not in selection:
            raise r.error("RECURSIVEMATCH needs SUBSCRIBED")
        r.sp()
    reference = yield from r.mailbox()
    r.sp()
    if r.peek() == 0x28:
        extended = True
        r.pos += 1
        patterns = [(yield from r.list_mailbox())]
        while r.peek() == 0x20:
            r.pos += 1
            patterns.append((yield from r.list_mailbox()))
        r.close_paren()
    else:
        patterns = [(yield from r.list_mailbox())]
    returns: list[str] = []
    status_items = None
    if not r.at_end():
        extended = True
        r.sp()
        if not r.try_word("RETURN"):
            raise r.expected("RETURN")
        r.sp()
        r.open_paren("return options")
        while r.peek() != 0x29:
            if returns:
                r.sp()
            option = r.word("a return option")
            if option not in _LIST_RETURN_OPTIONS:
                raise r.error(f"unsupported return option {option}")
            if option == "STATUS":
                if status_items is not None:
                    raise r.error("STATUS given twice")
                r.sp()
                status_items = r.status_items()
            returns.append(option)
        r.close_paren()
    return List(reference, tuple(patterns), selection, tuple(returns), status_items, extended)


# lsub = "LSUB" SP mailbox SP list-mailbox       (RFC 3501 §9)
def _lsub(r: Reader) -> Parse[Lsub]:
    r.sp()
    reference = yield from r.mailbox()
    r.sp()
    return Lsub(reference, (yield from r.list_mailbox()))


# status = "STATUS" SP mailbox SP "(" status-att *(SP status-att) ")"
def _status(r: Reader) -> Parse[Status]:
    r.sp()
    mailbox = yield from r.mailbox()
    r.sp()
    return Status(mailbox, r.status_items())


# append = "APPEND" SP mailbox 1*append-message                       (RFC 3502)
# append-message = append-opts SP append-data
# append-opts = [SP flag-list] [SP date-time]
# append-data = literal / literal8                                    (RFC 3516)
# append-data =/ "UTF8" SP "(" literal8 ")"                           (RFC 6855 §4)
def _append(r: Reader) -> Parse[Append]:
    r.sp()
    mailbox = yield from r.mailbox()
    messages = []
    while True:
        r.sp()
        flags: tuple[str, ...] = ()
        date = None
        if r.peek() == 0x28:
            flags = r.flag_list()
            r.sp()
        if r.peek() == 0x22:
            date = r.date_time()
            r.sp()
        utf8_data = r.try_word("UTF8")
        if utf8_data:
            r.sp()
            r.open_paren('"(" and the message')
        if r.peek() not in (0x7B, 0x7E):
            raise r.expected("the message literal")
        data = yield from r.literal(message=True, mailbox=mailbox, binary_ok=True)
        binary = r.last_literal_binary
        if utf8_data:
            r.close_paren()
        messages.append(AppendMessage(data, flags, date, binary))
        if r.at_end():
            return Append(mailbox, tuple(messages))


# search = "SEARCH" [search-return-opts] SP search-program           (RFC 9051 §9)
# search-return-opts = SP "RETURN" SP "(" [search-return-opt *(SP search-return-opt)] ")"
# search-program = ["CHARSET" SP charset SP] search-key *(SP search-key)
# charset = atom / quoted
def _search(r: Reader, uid: bool) -> Parse[Search]:
    r.sp()
    returns = None
    if r.try_word("RETURN"):
        r.sp()
        returns = r.paren_words("return options")
        for option in returns:
            if option not in SEARCH_RETURN_OPTIONS:
                raise r.error(f"unsupported return option {option}")
        r.sp()
    charset = None
    if r.try_word("CHARSET"):
        r.sp()
        charset = r.quoted().decode("ascii", "replace") if r.peek() == 0x22 else r.atom("a charset")
        r.sp()
    r.set_search_charset(charset)
    criteria = yield from r.search_keys()
    return Search(criteria, charset, returns, uid)


# fetch = "FETCH" SP sequence-set SP ("ALL" / "FULL" / "FAST" / fetch-att / "(" fetch-att *(SP fetch-att) ")")
#         [fetch-modifiers]
# fetch-modifiers = SP "(" fetch-modifier *(SP fetch-modifier) ")"         (RFC 4466 §2.4)
# fetch-modifier =/ "CHANGEDSINCE" SP mod-sequence-value                    (RFC 7162 §7)
def _fetch(r: Reader, uid: bool) -> Parse[Fetch]:
    r.sp()
    sequence_set = r.sequence_set()
    r.sp()
    attributes = yield from r.fetch_attributes()
    changed_since = None
    if not r.at_end():
        r.sp()
        r.open_paren("fetch modifiers")
        if r.word("a fetch modifier") != "CHANGEDSINCE":
            raise r.error("unsupported fetch modifier")
        r.sp()
        changed_since = r.mod_sequence(zero=False)
        r.close_paren()
    return Fetch(sequence_set, attributes, uid, changed_since)


# store = "STORE" SP sequence-set [store-modifiers] SP store-att-flags
# store-modifiers = SP "(" store-modifier *(SP store-modifier) ")"          (RFC 4466 §2.5)
# store-modifier =/ "UNCHANGEDSINCE" SP mod-sequence-valzer                 (RFC 7162 §7)
# store-att-flags = (["+" / "-"] "FLAGS" [".SILENT"]) SP (flag-list / (flag *(SP flag)))
_STORE_MODES = {"FLAGS": REPLACE, "+FLAGS": ADD, "-FLAGS": REMOVE}


def _store(r: Reader, uid: bool) -> Store:
    r.sp()
    sequence_set = r.sequence_set()
    r.sp()
    unchanged_since = None
    if r.peek() == 0x28:
        r.pos += 1
        if r.word("a store modifier") != "UNCHANGEDSINCE":
            raise r.error("unsupported store modifier")
        r.sp()
        unchanged_since = r.mod_sequence(zero=True)
        r.close_paren()
        r.sp()
    sign = ""
    if r.peek() in (0x2B, 0x2D):
        sign = chr(r.peek())
        r.pos += 1
    item = r.word("FLAGS, +FLAGS or -FLAGS")
    silent = item.endswith(".SILENT")
    mode = _STORE_MODES.get(sign + item.removesuffix(".SILENT"))
    if mode is None:
        raise r.error("expected FLAGS, +FLAGS or -FLAGS")
    r.sp()
    if r.peek() == 0x28:
        flags = r.flag_list()
    else:
        flags_list = [r.flag()]
        while r.peek() == 0x20:
            r.pos += 1
            flags_list.append(r.flag())
        flags = tuple(flags_list)
    return Store(sequence_set, mode, flags, silent, uid, unchanged_since)


# copy = "COPY" SP sequence-set SP mailbox; move = "MOVE" SP sequence-set SP mailbox   (RFC 6851)
def _copy_args(r: Reader) -> Parse[tuple[SequenceSet, str]]:
    r.sp()
    sequence_set = r.sequence_set()
    r.sp()
    return sequence_set, (yield from r.mailbox())


def _copy(r: Reader, uid: bool) -> Parse[Copy]:
    return Copy(*(yield from _copy_args(r)), uid=uid)


def _move(r: Reader, uid: bool) -> Parse[Move]:
    return Move(*(yield from _copy_args(r)), uid=uid)


# uid-expunge = "UID" SP "EXPUNGE" SP sequence-set         (RFC 4315 §4)
def _uid_expunge(r: Reader) -> Expunge:
    r.sp()
    return Expunge(r.sequence_set())


# The command table: name -> (class, parser).  UID variants take a ``uid`` flag.
COMMANDS: dict[str, tuple[type, Callable[..., Any]]] = {
    "CAPABILITY": (Capability, _no_arguments(Capability)),
    "NOOP": (Noop, _no_arguments(Noop)),
    "LOGOUT": (Logout, _no_arguments(Logout)),
    "ID": (Id, _id),
    "STARTTLS": (StartTls, _no_arguments(StartTls)),
    "AUTHENTICATE": (Authenticate, _authenticate),
    "LOGIN": (Login, _login),
    "ENABLE": (Enable, _enable),
    "SELECT": (Select, _select),
    "EXAMINE": (Examine, _examine),
    "CREATE": (Create, _create),
    "DELETE": (Delete, _one_mailbox(Delete)),
    "RENAME": (Rename, _rename),
    "SUBSCRIBE": (Subscribe, _one_mailbox(Subscribe)),
    "UNSUBSCRIBE": (Unsubscribe, _one_mailbox(Unsubscribe)),
    "LIST": (List, _list),
    "LSUB": (Lsub, _lsub),
    "NAMESPACE": (Namespace, _no_arguments(Namespace)),
    "STATUS": (Status, _status),
    "APPEND": (Append, _append),
    "IDLE": (Idle, _no_arguments(Idle)),
    "CHECK": (Check, _no_arguments(Check)),
    "CLOSE": (Close, _no_arguments(Close)),
    "UNSELECT": (Unselect, _no_arguments(Unselect)),
    "EXPUNGE": (Expunge, _no_arguments(Expunge)),
    "SEARCH": (Search, lambda r: _search(r, False)),
    "FETCH": (Fetch, lambda r: _fetch(r, False)),
    "STORE": (Store, lambda r: _store(r, False)),
    "COPY": (Copy, lambda r: _copy(r, False)),
    "MOVE": (Move, lambda r: _move(r, False)),
    "UID SEARCH": (Search, lambda r: _search(r, True)),
    "UID FETCH": (Fetch, lambda r: _fetch(r, True)),
    "UID STORE": (Store, lambda r: _store(r, True)),
    "UID COPY": (Copy, lambda r: _copy(r, True)),
    "UID MOVE": (Move, lambda r: _move(r, True)),
    "UID EXPUNGE": (Expunge, _uid_expunge),
}


# command = tag SP (command-any / command-auth / command-nonauth / command-select) CRLF
def parse_command(
    line: bytes, *, utf8: bool = False, max_depth: int = DEFAULT_MAX_DEPTH
) -> Generator[LiteralSpec, tuple[bytes, bytes], tuple[str, object]]:
    """Parse one command from its first line (without CRLF); see :mod:`.grammar` for literals.

    Returns ``(tag, command)``.  A GrammarError carries the tag when one
    was read, so that the answer can be a tagged BAD.
    """
    reader = Reader(line, utf8=utf8, max_depth=max_depth)
    try:
        tag = reader.tag_()
        if reader.at_end():
            raise reader.error("missing command")
        reader.expect(b" ", "a space after the tag")
        name = reader.word("a command name")
        if name == "UID":
            reader.expect(b" ", "a command after UID")
            name = "UID " + reader.word("a command after UID")
        entry = COMMANDS.get(name)
        if entry is None:
            raise reader.error("unknown command")
        reader.name = name
        result = entry[1](reader)
        command = (yield from result) if isinstance(result, Generator) else result
        reader.end()
        return tag, command
    except GrammarError as exc:
        exc.tag = reader.tag
        raise


def decode_plain(response: bytes) -> tuple[str, str, str]:
    """SASL PLAIN (RFC 4616 §2): ``[authzid] NUL authcid NUL passwd`` -> (authzid, authcid, password).

    GrammarError (a RemoteProtocolError) when the message is malformed:
    not exactly three parts, an empty authcid or password, or not UTF-8.
    """
    parts = response.split(b"\x00")
    if len(parts) != 3 or not parts[1] or not parts[2]:
        raise GrammarError("malformed PLAIN response")
    try:
        authzid, authcid, password = (part.decode("utf-8") for part in parts)
    except UnicodeDecodeError:
        raise GrammarError("PLAIN response is not UTF-8") from None
    return authzid, authcid, password
