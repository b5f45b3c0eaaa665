"""vncd console tickets for websockify (issue #12).

vncd compiles this file in and writes it to STATE_DIR/websockify/ at start; see docs/TICKETS.md.

A websockify token plugin that accepts a vncd console ticket instead of a fixed token:

    PYTHONPATH=/usr/share/vncd/websockify \\
    websockify --token-plugin vncd_ticket.VncdTicket --token-source KEYFILE [HOST:]PORT

KEYFILE (mode 0600, owned by the user websockify runs as; written by vncd, see
`vncd::ticket::websockify_key_file`) holds this lease's key, its target and the directory
that records used tickets:

    vncd-lease-key v1
    session NAME
    key 64-HEX-DIGITS
    host HOST          and  port PORT     (a TCP target)
    unix PATH                             (a unix-socket target)
    nonces DIR

A ticket is `v1.EXPIRY.NONCE.MAC`, with EXPIRY decimal unix seconds (no leading zeros),
NONCE 16 bytes and MAC = HMAC-SHA256(lease key, "v1." EXPIRY "." NONCE) 32 bytes, both
base64url without padding (22 and 43 characters). This module checks it exactly as
src/ticket/format.rs does (tests/data/ticket-vectors.json pins both): strict format, MAC compared
with hmac.compare_digest, valid while now < EXPIRY, and single use: the first use creates
DIR/EXPIRY.NONCE with O_CREAT|O_EXCL, which fails for every later use, also across the
processes websockify forks per connection. Records are pruned 60 s after their expiry; the
clock is read again after recording so a replay that stalled past the pruning is refused.

The key file is read again for every connection, so vncd can replace it (a new lease key
after a retarget) without restarting websockify.

Every ticket's expiry must lie within MAX_TTL_SECS + MAX_CLOCK_SKEW_SECS of now, as in
src/ticket/format.rs: no vncd mints longer ones, and a ticket of years would keep its
used-ticket record from ever being pruned.

Single use, spent last. websockify calls the token plugin's lookup() *before* it checks the
websocket handshake (Upgrade, Sec-WebSocket-Version, -Key, -Protocol), so spending the ticket
there would let a malformed upgrade waste a good ticket. vncd therefore also passes
`--auth-plugin vncd_ticket.VncdSpend`: lookup() only verifies and remembers the ticket for
this connection, and VncdSpend.authenticate(), which websockify calls next with the request
headers, applies the same handshake checks as websockify's own accept() and only then spends
it. What can still fail after that is the socket itself. Without the auth plugin (an older
command line) lookup() spends at once, as before.

Refusals raise TicketRefused rather than returning None: on None websockify logs
"Token '<the ticket>' not found", while an exception makes it log only our message
("handler exception: vncd ticket refused ..."), which never contains the ticket. Either
way the connection is closed before the websocket upgrade and before any target is
contacted.
"""

import base64
import hashlib
import hmac
import os
import re
import stat
import threading
import time

VERSION = "v1"
KEY_FILE_MAGIC = "vncd-lease-key v1"
KEY_LEN = 32
NONCE_LEN = 16
NONCE_B64_LEN = 22
MAC_B64_LEN = 43
MAX_TICKET_LEN = 3 + 20 + 1 + NONCE_B64_LEN + 1 + MAC_B64_LEN
PRUNE_GRACE_SECS = 60
MAX_TTL_SECS = 3600
MAX_CLOCK_SKEW_SECS = 30
MAX_KEY_FILE = 64 * 1024
U64_MAX = 2 ** 64 - 1

_DECIMAL = re.compile(r"\A(?:0|[1-9][0-9]*)\Z")
_B64URL = re.compile(r"\A[A-Za-z0-9_-]*\Z")


class TicketError(Exception):
    """A ticket was refused. The message names the reason, never the ticket."""


class Malformed(TicketError):
    def __init__(self):
        super().__init__("malformed ticket")


class BadSignature(TicketError):
    def __init__(self):
        super().__init__(
            "ticket signature does not verify "
            "(forged, altered, or minted for an earlier lease)")


class Expired(TicketError):
    def __init__(self):
        super().__init__("ticket expired")


class TooFarAhead(TicketError):
    def __init__(self):
        super().__init__("ticket expiry lies beyond the longest ticket TTL")


class Replayed(TicketError):
    def __init__(self):
        super().__init__("ticket already used")


class NonceStoreError(TicketError):
    def __init__(self, directory, err):
        super().__init__("cannot record ticket use in %s: %s" % (directory, err))


class KeyFileError(Exception):
    """The key file cannot be trusted or parsed. Names the file, never a ticket."""


class TicketRefused(Exception):
    """What lookup() raises: websockify logs this message and closes the connection."""


def _b64decode(text, chars, length):
    """Strict base64url without padding: exactly `chars` characters, `length` bytes, and
    the canonical spelling (zero trailing bits), as the Rust decoder demands."""
    if len(text) != chars or not _B64URL.match(text):
        raise Malformed()
    raw = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    if len(raw) != length or _b64encode(raw) != text:
        raise Malformed()
    return raw


def _b64encode(raw):
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode("ascii")


def _decimal(text):
    if not _DECIMAL.match(text):
        raise Malformed()
    value = int(text)
    if value > U64_MAX:
        raise Malformed()
    return value


def verify(key, text, now):
    """Check `text` against the 32-byte lease `key` at unix time `now`.

    Returns (nonce bytes, expiry); raises Malformed, BadSignature, Expired or TooFarAhead.
    The MAC is checked before the expiry, so Expired is only said of an authentic ticket."""
    if not isinstance(text, str) or len(text) > MAX_TICKET_LEN:
        raise Malformed()
    signed, dot, mac_b64 = text.rpartition(".")
    if not dot:
        raise Malformed()
    fields = signed.split(".")
    if len(fields) != 3 or fields[0] != VERSION:
        raise Malformed()
    expires_at = _decimal(fields[1])
    nonce = _b64decode(fields[2], NONCE_B64_LEN, NONCE_LEN)
    mac = _b64decode(mac_b64, MAC_B64_LEN, KEY_LEN)
    # Every field matched an ASCII-only pattern, so `signed` is ASCII.
    expected = hmac.new(key, signed.encode("ascii"), hashlib.sha256).digest()
    if not hmac.compare_digest(expected, mac):
        raise BadSignature()
    if now >= expires_at:
        raise Expired()
    if expires_at > now + MAX_TTL_SECS + MAX_CLOCK_SKEW_SECS:
        raise TooFarAhead()
    return nonce, expires_at


def nonce_file_name(nonce, expires_at):
    """The record of a used ticket: EXPIRY.NONCE (base64url), as DirNonces names it."""
    return "%d.%s" % (expires_at, _b64encode(nonce))


def consume(directory, nonce, expires_at, clock=time.time):
    """Record the use of a verified ticket; Replayed if it was used before."""
    path = os.path.join(directory, nonce_file_name(nonce, expires_at))
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    try:
        os.close(os.open(path, flags, 0o600))
    except FileExistsError:
        raise Replayed()
    except OSError as err:
        raise NonceStoreError(directory, err.strerror or err)
    # After recording: had a pruner removed an earlier record of this ticket, the ticket
    # has expired by now, so a replay that raced the pruner ends here.
    if int(clock()) >= expires_at:
        raise Expired()
    try:
        prune(directory, clock)
    except OSError:
        # Housekeeping only: a good ticket is not refused for it; the next use retries.
        pass


def prune(directory, clock=time.time):
    """Remove records whose ticket expired PRUNE_GRACE_SECS ago or more; others' files stay."""
    limit = int(clock()) - PRUNE_GRACE_SECS
    removed = 0
    for name in os.listdir(directory):
        expiry, dot, nonce = name.partition(".")
        if not dot:
            continue
        try:
            expires_at = _decimal(expiry)
            _b64decode(nonce, NONCE_B64_LEN, NONCE_LEN)
        except Malformed:
            continue
        if expires_at <= limit:
            try:
                os.unlink(os.path.join(directory, name))
                removed += 1
            except FileNotFoundError:
                pass
    return removed


class KeyFile(object):
    """A parsed key file: session, key, target and nonce directory."""

    def __init__(self, session, key, target, nonces):
        self.session = session
        self.key = key
        self.target = target
        self.nonces = nonces

    def __repr__(self):
        return "KeyFile(session=%r, key=<redacted>, target=%r, nonces=%r)" % (
            self.session, self.target, self.nonces)


def load_key_file(path):
    """Read and check a key file: a regular file (no symlink), of our own user, not
    accessible to group or others, in the format vncd writes."""
    flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
    try:
        fd = os.open(path, flags)
    except OSError as err:
        raise KeyFileError("key file %s: cannot open it: %s" % (path, err.strerror or err))
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise KeyFileError("key file %s is not a regular file" % path)
        if st.st_uid != os.geteuid():
            raise KeyFileError("key file %s is owned by uid %d, not by uid %d"
                               % (path, st.st_uid, os.geteuid()))
        if st.st_mode & 0o077:
            raise KeyFileError("key file %s has mode %04o; it must be 0600"
                               % (path, stat.S_IMODE(st.st_mode)))
        data = os.read(fd, MAX_KEY_FILE + 1)
    finally:
        os.close(fd)
    if len(data) > MAX_KEY_FILE:
        raise KeyFileError("key file %s is too large" % path)
    try:
        lines = data.decode("utf-8").split("\n")
    except UnicodeDecodeError:
        raise KeyFileError("key file %s is not UTF-8" % path)
    if lines[0] != KEY_FILE_MAGIC:
        raise KeyFileError("key file %s does not start with %r" % (path, KEY_FILE_MAGIC))
    fields = {}
    for line in lines[1:]:
        if not line:
            continue
        name, space, value = line.partition(" ")
        if not space or name in fields:
            raise KeyFileError("key file %s: bad or repeated line %r" % (path, name))
        fields[name] = value
    try:
        key = bytes.fromhex(fields["key"])
        if len(key) != KEY_LEN or not re.match(r"\A[0-9a-fA-F]+\Z", fields["key"]):
            raise ValueError
    except (KeyError, ValueError):
        raise KeyFileError("key file %s: no valid 'key' line" % path)
    if "unix" in fields and "host" not in fields and "port" not in fields:
        target = ("unix_socket", fields["unix"])
    elif "host" in fields and "port" in fields and "unix" not in fields:
        if not fields["host"] or not re.match(r"\A[1-9][0-9]{0,4}\Z", fields["port"]) \
                or int(fields["port"]) > 65535:
            raise KeyFileError("key file %s: bad 'host' or 'port'" % path)
        target = (fields["host"], fields["port"])
    else:
        raise KeyFileError("key file %s: needs 'host' and 'port', or 'unix'" % path)
    if not fields.get("nonces"):
        raise KeyFileError("key file %s: no 'nonces' line" % path)
    return KeyFile(fields.get("session", "?"), key, target, fields["nonces"])


def check(keyfile, ticket, clock=time.time):
    """Verify and consume `ticket` for the lease of `keyfile` (a KeyFile)."""
    nonce, expires_at = verify(keyfile.key, ticket, int(clock()))
    consume(keyfile.nonces, nonce, expires_at, clock)


# Set once VncdSpend is constructed (websockify builds its plugins at start, before it
# forks per connection): lookup() then leaves the spending to VncdSpend.authenticate().
_SPEND_IN_AUTH = [False]
# The ticket lookup() verified for the connection being handled, spent by authenticate().
# websockify handles one connection per forked process (or per thread), so a thread-local
# holds exactly that connection's ticket.
_PENDING = threading.local()


class VncdTicket(object):
    """The websockify token plugin: `--token-plugin vncd_ticket.VncdTicket
    --token-source KEYFILE`. websockify constructs it once with the source string and
    calls lookup(token) for every websocket upgrade (in the process forked for it)."""

    def __init__(self, src):
        self.source = src

    def lookup(self, token):
        """The target as websockify wants it: (host, port), or ("unix_socket", path).
        Any failure raises TicketRefused (see the module docs for why not None)."""
        _PENDING.ticket = None
        try:
            keyfile = load_key_file(self.source)
        except KeyFileError as err:
            raise TicketRefused("vncd ticket refused: %s" % err)
        try:
            if _SPEND_IN_AUTH[0]:
                nonce, expires_at = verify(keyfile.key, token, int(time.time()))
                _PENDING.ticket = (keyfile, nonce, expires_at)
            else:
                check(keyfile, token)
        except TicketError as err:
            raise TicketRefused("vncd ticket refused (session %s): %s" % (keyfile.session, err))
        return keyfile.target


def _auth_error(code, message):
    """websockify's AuthenticationError (it answers with `code` and closes), or a plain
    exception where websockify is not importable (the plugin's own tests)."""
    try:
        from websockify.auth_plugins import AuthenticationError
    except ImportError:
        return TicketRefused(message)
    return AuthenticationError(log_msg=message, response_code=code, response_msg=message)


def upgrade_problem(headers):
    """Why websockify's accept() would refuse these upgrade headers, or None. The same
    checks in the same order (websockify/websocket.py, WebSocket.accept), so a ticket is
    spent only for an upgrade that websockify then completes."""
    if (headers.get("upgrade", "") or "").lower() != "websocket":
        return "missing or incorrect upgrade header"
    if headers.get("Sec-WebSocket-Version") not in ("7", "8", "13"):
        return "missing or unsupported Sec-WebSocket-Version"
    if headers.get("Sec-WebSocket-Key") is None:
        return "missing Sec-WebSocket-Key"
    protocols = (headers.get("Sec-WebSocket-Protocol", "") or "").split(",")
    chosen = "binary" if "binary" in protocols else ""
    if chosen not in protocols:
        return "no acceptable Sec-WebSocket-Protocol"
    return None


class VncdSpend(object):
    """The websockify auth plugin: `--auth-plugin vncd_ticket.VncdSpend`. Spends the ticket
    that VncdTicket.lookup() verified, once the upgrade headers pass websockify's checks."""

    def __init__(self, src=None):
        self.source = src
        _SPEND_IN_AUTH[0] = True

    def authenticate(self, headers, target_host, target_port):
        pending = getattr(_PENDING, "ticket", None)
        _PENDING.ticket = None
        if pending is None:
            # lookup() refused (it raised) or never ran: nothing may pass.
            raise _auth_error(403, "vncd ticket refused: no verified ticket for this upgrade")
        keyfile, nonce, expires_at = pending
        problem = upgrade_problem(headers)
        if problem is not None:
            raise _auth_error(400, "bad websocket upgrade (ticket not used): %s" % problem)
        try:
            consume(keyfile.nonces, nonce, expires_at)
        except TicketError as err:
            raise _auth_error(
                403, "vncd ticket refused (session %s): %s" % (keyfile.session, err))
