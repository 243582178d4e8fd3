#!/usr/bin/env python3
"""respawn.py: a process supervisor in one file, standard library only.

Copy this file onto a server, describe services in an INI file, and run

    python3 respawn.py -c respawn.ini            # supervise in the foreground
    python3 respawn.py -c respawn.ini status     # ask the running supervisor

Every service is started in its own process group, watched through pidfds
(SIGCHLD + waitpid where pidfds are missing) and restarted by its policy,
with exponential backoff after failed starts.  When this file is replaced on
disk the supervisor re-executes the new version in place and hands over every
service's PID, state, timers and output pipes: nothing is restarted and no
output line is lost.  `python3 respawn.py --help` lists the commands.

Reading order (the banners below, in this order):
  constants and small helpers;
  config: parse, type and validate the INI;
  service policy: the Service record, events, effects and step(), the one
    place where a service's life is decided;
  processes: spawn, signal, the child watchers;
  output: pipes, log files;
  event listeners: supervisord's [eventlistener:x] protocol, its events and
    buffers (EventHub, fed by the Supervisor's state changes);
  event loop: timers, and the Supervisor that feeds events to step() and
    performs its effects (also sd_notify, reload, the control requests'
    snapshot, re-execution), and probes;
  control socket: connections, and REQUESTS, one small function per command;
  operations: Prometheus metrics (format and HTTP endpoint), on_change hooks,
    our own systemd notifications, journald;
  re-execution: file watch, the loader, the handoff codec;
  client; command line.
"""

__version__ = "1.1.0"

import errno
import fcntl
import gc
import heapq
import itertools
import json
import os
import re
import selectors
import signal
import socket
import stat
import struct
import sys
import time

# configparser, glob, shlex and subprocess are imported where they are used: an
# image re-executed with its config handed over parses no INI and starts no
# process until it must, and takes over sooner (the handoff window).
# Nor are argparse, random or shutil imported at all (see parse_args, uniform,
# which), nor OpenSSL (see sha256): each would stay in a supervisor's memory for its life.

# ---------------------------------------------------------------------------
# Constants and small helpers
# ---------------------------------------------------------------------------

STOPPED, STARTING, RUNNING, BACKOFF, STOPPING, EXITED, FATAL = (
    "STOPPED", "STARTING", "RUNNING", "BACKOFF", "STOPPING", "EXITED", "FATAL")

EXIT_OK, EXIT_FAIL, EXIT_CONFIG, EXIT_NOT_RUNNING = 0, 1, 2, 3
PROTOCOL = 1                      # control-socket protocol version
HANDOFF_FORMAT = 2                # re-exec state format version (1, of respawn 1.0.0, is still read)
READ_SIZE = 1 << 20               # one read from a service pipe
# os.splice moves a pipe's pages into a log file without a copy through us (3.10+)
SPLICE = hasattr(os, "splice")
SPLICE_FLAGS = 1 | 2 if SPLICE else 0   # SPLICE_F_MOVE | SPLICE_F_NONBLOCK
MAX_PARTIAL = 64 * 1024           # a longer line without newline is cut here
TAIL_LINES = 500                  # lines kept in memory per service for `log`
MAX_REQUEST = 64 * 1024           # control-socket request size limit
RECV_SIZE = 256 * 1024            # one read of an answer by the client
CLIENT_TIMEOUT = 10.0             # a client must send its request within this
BIG_ANSWER = 256 * 1024           # an answer this long is followed by malloc_trim
MAX_WAIT = 3600.0                 # the loop wakes at least this often (Timers.timeout)
HANDLED_SIGNALS = ("SIGTERM", "SIGINT", "SIGQUIT", "SIGHUP", "SIGUSR1", "SIGUSR2", "SIGCHLD")


def monotonic():
    return time.monotonic()


def did_you_mean(word, choices):
    if len(word) > 100:
        return ""          # no one mistypes a word that long, and difflib would take its time
    import difflib  # only on the error path
    close = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.6)
    return " (did you mean %r?)" % close[0] if close else ""


def utf8_clean(data):
    """Whether bytes are valid UTF-8 (so decoding with "replace" would change nothing)."""
    if data.isascii():
        return True
    try:
        data.decode("utf-8")
        return True
    except UnicodeDecodeError:
        return False


def write_all(fd, data):
    """Write every byte to a blocking or non-blocking fd; True unless the reader is gone."""
    view = memoryview(data)
    while view:
        try:
            n = os.write(fd, view)
        except BlockingIOError:
            selectors.select.select([], [fd], [], 1.0)
            continue
        except (BrokenPipeError, OSError) as exc:
            if isinstance(exc, BrokenPipeError) or exc.errno in (errno.EIO, errno.EBADF, errno.EPIPE):
                return False
            raise
        view = view[n:]
    return True


def exit_code_of(wait_status):
    """A waitpid status as Popen.returncode: the exit code, or minus the signal."""
    if os.WIFSIGNALED(wait_status):
        return -os.WTERMSIG(wait_status)
    return os.WEXITSTATUS(wait_status)


def signal_number(text):
    """'TERM', 'SIGTERM', 'term' or '15' -> 15; ValueError otherwise."""
    text = text.strip()
    if re.match(r"[0-9]+\Z", text):     # ASCII: int() also takes '٣' (3, SIGQUIT)
        num = int(text)
        if num in {s.value for s in signal.Signals}:
            return num
        raise ValueError(text)
    name = text.upper()
    if not name.startswith("SIG"):
        name = "SIG" + name
    if name.startswith("SIG_") or not hasattr(signal, name):
        raise ValueError(text)
    return int(getattr(signal, name))


def signal_name(num):
    try:
        return signal.Signals(num).name
    except ValueError:
        return str(num)


def fmt_duration(seconds):
    seconds = int(max(0, seconds))
    days, rest = divmod(seconds, 86400)
    text = "%d:%02d:%02d" % (rest // 3600, rest % 3600 // 60, rest % 60)
    return ("%dd %s" % (days, text)) if days else text


def plural(n, word):
    """'1 service', '3 services'."""
    return "%d %s%s" % (n, word, "" if n == 1 else "s")


def describe_exit(status):
    if status is None:
        return "exit status unknown"
    if status < 0:
        return "killed by %s" % signal_name(-status)
    return "exit %d" % status


# hashlib as on a Python built without OpenSSL: CPython's own SHA-256, same
# digest.  With OpenSSL, hashlib loads libcrypto, about 3 MiB of a supervisor's
# memory for hashing one file now and then.  A None in sys.modules makes an
# import fail, and hashlib falls back to its built-in implementations.
if "_hashlib" in sys.modules:
    from hashlib import sha256
else:
    sys.modules["_hashlib"] = None
    try:
        from hashlib import sha256
    finally:
        del sys.modules["_hashlib"]


def uniform():
    """A float in [0, 1) for backoff jitter (the random module is 0.5 MiB we
    would import for this one number)."""
    return int.from_bytes(os.urandom(7), "big") / (1 << 56)


def which(command, path):
    """shutil.which(command, path=path) without shutil (which imports bz2, lzma
    and zlib: 2 MiB of a supervisor's memory)."""
    for folder in path.split(os.pathsep):
        full = os.path.join(folder or ".", command)
        if os.path.isfile(full) and os.access(full, os.X_OK):
            return full
    return None


def file_hash(path):
    with open(path, "rb") as f:
        return sha256(f.read()).hexdigest()


# ---------------------------------------------------------------------------
# Config: parse, type and validate the INI, every error with file and line
# ---------------------------------------------------------------------------

class ConfigError(Exception):
    """A mistake in a config file: shown to the user as one line, FILE:LINE: what.
    As a warning, level is "warning", or "info" for what needs no action."""

    def __init__(self, message, file=None, line=None, level="warning"):
        if len(message) > MAX_MESSAGE:
            message = message[:MAX_MESSAGE] + "..."
        super().__init__(message)
        self.message, self.file, self.line, self.level = message, file, line, level

    def __str__(self):
        where = self.file or "<config>"
        if self.line:
            where += ":%d" % self.line
        return "%s: %s" % (where, self.message)


class ConfigErrors(Exception):
    """Every problem found in one pass, so `check` can report them all at once."""

    def __init__(self, errors, warnings=()):
        super().__init__("; ".join(str(e) for e in errors))
        self.errors, self.warnings = list(errors), list(warnings)
        self.settings = None          # [respawn] as far as it parsed: clients still find the socket


# Reading a config is bounded whatever the file holds: far above any file a
# person writes, these keep a mistaken or hostile one (/dev/zero, a FIFO, a
# chain of includes, a megabyte of spaces) from freezing `check` or `run`.
MAX_CONFIG_BYTES = 4 << 20        # one file (5000 generated programs take ~1 MiB)
MAX_CONFIG_FILES = 1000           # files in one config, includes counted
MAX_INCLUDE_DEPTH = 20            # [include] within [include] ...
MAX_SERVICES = 10000              # services in one config, instances counted
MAX_MESSAGE = 400                 # an error line quotes at most this much
# Ranges of values: each one runs.  A week is far below what a timer holds (epoll
# takes ~24 days in milliseconds); the counts bound memory and files.
MAX_DURATION = 7 * 86400.0
MAX_SIZE = 1024 ** 4
MAX_ID = 2 ** 32 - 2              # uid/gid: (uid_t)-1 means "no change" to the kernel
MAX_PRIORITY = 10 ** 9

# matched on the stripped text: two runs of [ \t]* around an optional unit
# backtrack quadratically on "1<100000 spaces>x"
_DURATION = re.compile(r"([0-9]{1,30}(?:\.[0-9]{0,30})?|\.[0-9]{1,30})[ \t]*(ms|s|m|h|d)?\Z", re.I)
_DURATION_UNITS = {None: 1.0, "ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
_SIZE = re.compile(r"([0-9]{1,30})[ \t]*(b|kb|mb|gb)?\Z", re.I)
_SIZE_UNITS = {None: 1, "b": 1, "kb": 1024, "mb": 1024 ** 2, "gb": 1024 ** 3}
_INT = re.compile(r"([+-]?[0-9]{1,30})\Z")
_BOOLS = {"true": True, "yes": True, "on": True, "1": True,
          "false": False, "no": False, "off": False, "0": False}


def _cut(text, n=60):
    """A value as an error line quotes it: repr, and not a megabyte of it."""
    return repr(text if len(text) <= n else text[:n] + "...")


_NUMBERS = {}           # (type, value) -> the one object typed for it (see _shared)


def _shared(value):
    """One object for every equal number typed (they are immutable): 5000 programs'
    `startsecs = 0` were 5000 floats, 0.35 MiB with two such keys.  By type too, as
    0.0 == 0 == False; and only so many, so reloads of changing values do not grow it."""
    key = (type(value), value)
    if len(_NUMBERS) < 4096:
        return _NUMBERS.setdefault(key, value)
    return _NUMBERS.get(key, value)


def parse_duration(text):
    m = _DURATION.match(text.strip(" \t"))
    if not m:
        raise ValueError("expected a duration such as 10, 0.5, 500ms, 2s or 1m, not %s" % _cut(text))
    return _shared(float(m.group(1)) * _DURATION_UNITS[(m.group(2) or "").lower() or None])


def parse_size(text):
    m = _SIZE.match(text.strip(" \t"))
    if not m:
        raise ValueError("expected a size such as 1024, 10KB, 50MB or 1GB, not %s" % _cut(text))
    return _shared(int(m.group(1)) * _SIZE_UNITS[(m.group(2) or "").lower() or None])


def parse_bool(text):
    try:
        return _BOOLS[text.strip().lower()]
    except KeyError:
        raise ValueError("expected true or false, not %s" % _cut(text)) from None


def parse_int(text):
    # ASCII digits only: int() also takes '٣' and '1_000', which no one means
    m = _INT.match(text.strip(" \t"))
    if not m:
        raise ValueError("expected a whole number, not %s" % _cut(text))
    return int(m.group(1))


def _show_duration(seconds):
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds and seconds % size == 0:
            return "%d%s" % (seconds // size, unit)
    return "%g" % seconds


def _show_size(n):
    for unit, size in (("GB", 1024 ** 3), ("MB", 1024 ** 2), ("KB", 1024)):
        if n and n % size == 0:
            return "%d%s" % (n // size, unit)
    return "%d" % n


def in_range(parse, low, high, show=str):
    """parse, and refuse a value outside [low, high] with the range in the message."""
    def parse_in_range(text):
        value = parse(text)
        if value is not None and not low <= value <= high:
            raise ValueError("%s is out of range (expected %s to %s)"
                             % (_cut(text.strip()), show(low), show(high)))
        return value
    parse_in_range.range = (show(low), show(high))
    return parse_in_range


def parse_signal(text):
    try:
        return signal_number(text)
    except ValueError:
        raise ValueError("expected a signal name such as TERM, INT, HUP, QUIT or KILL, not %s"
                         % _cut(text)) from None


def parse_exitcodes(text):
    codes = set()
    for part in text.split(","):
        part = part.strip()
        if not re.match(r"[0-9]{1,3}\Z", part) or int(part) > 255:
            raise ValueError("expected exit codes 0-255 separated by commas, not %s" % _cut(text))
        codes.add(int(part))
    return frozenset(codes)


def parse_autorestart(text):
    value = text.strip().lower()
    if value == "unexpected":
        return "unexpected"
    try:
        return parse_bool(value)
    except ValueError:
        raise ValueError("expected true, false or unexpected, not %s" % _cut(text)) from None


MAX_RETRIES = 10 ** 6


def parse_startretries(text):
    if text.strip().lower() == "forever":
        return None
    try:
        value = parse_int(text)
    except ValueError:
        value = -1            # one message for every bad value, naming `forever` too
    if not 0 <= value <= MAX_RETRIES:
        raise ValueError("expected a number of retries (0 to %d) or forever, not %s"
                         % (MAX_RETRIES, _cut(text)))
    return value


parse_startretries.range = ("0", "1000000 or forever")

# words with no quote, backslash or odd whitespace: str.split() gives what
# shlex.split() gives, several times faster (500 programs load in a handoff)
_PLAIN_COMMAND = re.compile(r"[^\s'\"\\]+(?:[ \t]+[^\s'\"\\]+)*")


def parse_command(text):
    if _PLAIN_COMMAND.fullmatch(text):
        return tuple(text.split())
    import shlex
    try:
        argv = shlex.split(text)
    except ValueError as exc:
        raise ValueError("cannot split the command: %s" % exc) from None
    if not argv:
        raise ValueError("the command is empty")
    return tuple(argv)


def parse_umask(text):
    if not re.match(r"[ \t]*[0-7]{1,4}[ \t]*\Z", text):
        raise ValueError("expected an octal umask such as 022, not %s" % _cut(text))
    value = int(text.strip(), 8)
    if not 0 <= value <= 0o777:
        raise ValueError("expected an octal umask between 000 and 777, not %s" % _cut(text))
    return value


# a user or group: a name as useradd takes it (and user@domain of a directory
# service), or a number, which must be an id the kernel can hold
_ACCOUNT = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.@-]{0,255}\$?\Z")


def parse_account(text):
    value = text.strip()
    if not _ACCOUNT.match(value):
        raise ValueError("expected a user or group name (letters, digits, _ . @ -) or a number, "
                         "not %s" % _cut(text))
    if value.isdigit() and int(value) > MAX_ID:
        raise ValueError("%s is out of range (expected an id 0 to %d)" % (_cut(value), MAX_ID))
    return value


parse_account.range = ("0", str(MAX_ID))


def parse_environment(text):
    """supervisord's form: A="1",B="two words",C=3 (commas or newlines between)."""
    import shlex
    lexer = shlex.shlex(text, posix=True)
    lexer.whitespace = ",\n"
    lexer.whitespace_split = True
    env = {}
    try:
        items = list(lexer)
    except ValueError as exc:
        raise ValueError("cannot read the environment: %s" % exc) from None
    for item in items:
        key, sep, value = item.strip().partition("=")
        key = key.strip()
        if not sep or not re.match(r"[A-Za-z_][A-Za-z0-9_]*\Z", key):
            raise ValueError('expected KEY="value" pairs separated by commas, not %s' % _cut(item.strip()))
        env[key] = value
    return env


def parse_list(text):
    return tuple(x for x in re.split(r"[,\s]+", text.strip()) if x)


def parse_probe(text, allow_notify):
    """ready/healthcheck: tcp:HOST:PORT, exec:CMD, notify, none -> (kind, arg)."""
    value = text.strip()
    kinds = "tcp:HOST:PORT, exec:CMD" + (", notify or none" if allow_notify else "")
    if allow_notify and value.lower() in ("none", "notify"):
        return (value.lower(), None)
    kind, sep, arg = value.partition(":")
    kind = kind.lower()
    if kind == "exec" and sep:
        return ("exec", parse_command(arg))
    if kind == "tcp" and sep:
        host, sep2, port = arg.rpartition(":")
        host = host.strip("[]") or "127.0.0.1"
        if sep2 and re.match(r"[0-9]{1,5}\Z", port) and 0 < int(port) < 65536:
            return ("tcp", (host, int(port)))
        raise ValueError("expected tcp:HOST:PORT with a port 1-65535, not %s" % _cut(text))
    raise ValueError("expected %s, not %s" % (kinds, _cut(text)))


def parse_logfile(text):
    value = text.strip()
    if value.lower() in ("", "none", "off"):
        return "none"
    if value.lower() == "auto":
        return "auto"
    return value


def parse_loglevel(text):
    value = text.strip().lower()
    if value not in LOG_LEVELS:
        raise ValueError("expected one of %s, not %s" % (", ".join(LOG_LEVELS), _cut(text)))
    return value


def parse_log_format(text):
    value = text.strip().lower()
    if value not in ("text", "json"):
        raise ValueError("expected text or json, not %s" % _cut(text))
    return value


def parse_name(text):
    """process_name as written: expanded per instance, checked after."""
    if not text.strip():
        raise ValueError("the name is empty")
    return text.strip()


def parse_metrics_address(text):
    """`metrics = [HOST:]PORT` -> (host, port).  HOST is an IP address (a name would
    need DNS at start-up, which can block or lie) or `localhost`; no HOST is
    loopback, so that nothing is exposed unless the config says so."""
    value = text.strip()
    host, sep, port = value.rpartition(":")
    if not sep:
        host = ""
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    elif ":" in host:
        raise ValueError("write an IPv6 address in brackets, as [%s]:%s" % (host, port))
    host = host or "127.0.0.1"
    if not port.isdigit() or not port.isascii():
        raise ValueError("expected HOST:PORT or PORT (e.g. 127.0.0.1:9101), not %s" % _cut(text))
    if not 1 <= int(port) <= 65535:
        raise ValueError("port %s is out of range (1 to 65535)" % port)
    if host == "localhost":
        host = "127.0.0.1"            # not looked up: /etc/hosts may say otherwise, or ::1
    else:
        try:
            socket.inet_pton(socket.AF_INET6 if ":" in host else socket.AF_INET, host)
        except OSError:
            raise ValueError("%s is not an IP address (e.g. 127.0.0.1, 0.0.0.0 or [::1]; "
                             "host names are not resolved)" % _cut(host)) from None
    return host, int(port)


MAX_SOCKET_PATH = 107              # sockaddr_un.sun_path holds 108 bytes, the last a NUL


def parse_socket(text):
    """`socket = PATH`: bind() refuses a longer path, so check must too."""
    value = text.strip()
    if len(os.fsencode(value)) > MAX_SOCKET_PATH:
        raise ValueError("the path is %d bytes long; a Unix socket's path holds at most %d "
                         "(choose a shorter one)" % (len(os.fsencode(value)), MAX_SOCKET_PATH))
    return value or None


LOG_LEVELS = {"debug": 10, "info": 20, "warn": 30, "warning": 30, "error": 40, "critical": 50}

# key: (parser, default).  The defaults are the SPEC's.
RESPAWN_KEYS = {
    "socket": (parse_socket, None),
    "logfile": (str, None),
    "loglevel": (parse_loglevel, "info"),
    "pidfile": (str, None),
    "logdir": (str, None),
    "watch_self": (parse_bool, True),
    "watch_config": (parse_bool, False),
    "exit_on_fatal": (parse_bool, False),
    "subreaper": (parse_bool, False),
    "log_format": (parse_log_format, "text"),
    "metrics": (parse_metrics_address, None),
    "on_change": (parse_command, None),
}

parse_duration_in_range = in_range(parse_duration, 0.0, MAX_DURATION, _show_duration)
_size = in_range(parse_size, 0, MAX_SIZE, _show_size)
_backups = in_range(parse_int, 0, 1000)

PROGRAM_KEYS = {
    "command": (parse_command, None),
    "process_name": (parse_name, "%(program_name)s"),
    "numprocs": (in_range(parse_int, 1, MAX_SERVICES), 1),
    "numprocs_start": (in_range(parse_int, 0, 10 ** 6), 0),
    "directory": (str, None),
    "environment": (parse_environment, {}),
    "user": (parse_account, None),
    "group": (parse_account, None),
    "umask": (parse_umask, None),
    "autostart": (parse_bool, True),
    "autorestart": (parse_autorestart, True),
    "exitcodes": (parse_exitcodes, frozenset([0])),
    "startsecs": (parse_duration_in_range, 1.0),
    "startretries": (parse_startretries, 3),
    "backoff": (parse_duration_in_range, 1.0),
    "backoff_max": (parse_duration_in_range, 60.0),
    "stopsignal": (parse_signal, signal.SIGTERM),
    "stopwaitsecs": (parse_duration_in_range, 10.0),
    "stopasgroup": (parse_bool, True),
    "killasgroup": (parse_bool, True),
    "stdout_logfile": (parse_logfile, None),
    "stdout_logfile_maxbytes": (_size, 50 * 1024 ** 2),
    "stdout_logfile_backups": (_backups, 10),
    "redirect_stderr": (parse_bool, False),
    "stderr_logfile": (parse_logfile, None),
    "stderr_logfile_maxbytes": (_size, 50 * 1024 ** 2),
    "stderr_logfile_backups": (_backups, 10),
    "priority": (in_range(parse_int, -MAX_PRIORITY, MAX_PRIORITY), 999),
    "requires": (parse_list, ()),
    "ready": (lambda t: parse_probe(t, True), ("none", None)),
    "ready_timeout": (parse_duration_in_range, 60.0),
    "healthcheck": (lambda t: parse_probe(t, False), None),
    "healthcheck_interval": (parse_duration_in_range, 10.0),
    "healthcheck_failures": (in_range(parse_int, 1, 1000), 3),
    "watchdog": (parse_duration_in_range, 0.0),
    "backoff_reset": (parse_duration_in_range, 60.0),
}
PROGRAM_DEFAULTS = {key: default for key, (_, default) in PROGRAM_KEYS.items()}
# A file with a [supervisord] section gets supervisord 4's defaults where ours
# differ (its options.py); the README's "Coming from supervisord" lists them.
SUPERVISORD_DEFAULTS = {"autorestart": "unexpected", "stopasgroup": False, "killasgroup": False,
                        "stdout_logfile": "auto", "stderr_logfile": "auto"}

# supervisord program keys respawn does not implement: a warning, not an error,
# so that a supervisord [program:x] section runs unchanged.
SUPERVISORD_KEYS = {
    "serverurl", "stdout_capture_maxbytes", "stdout_events_enabled", "stdout_syslog",
    "stderr_capture_maxbytes", "stderr_events_enabled", "stderr_syslog", "nice"}

# [supervisord] keys: (parser, the setting it fills).  Where that needs run-time
# code (umask, minfds, minprocs, directory) apply_process_settings does it.
SUPERVISORD_SETTINGS = {
    "logfile": (str, "logfile"),
    "pidfile": (str, "pidfile"),
    "loglevel": (lambda t: {"trace": "debug", "blather": "debug"}.get(t.strip().lower())
                 or parse_loglevel(t), "loglevel"),
    "childlogdir": (str, "logdir"),
    "umask": (parse_umask, "umask"),
    "minfds": (in_range(parse_int, 1, 1 << 20), "minfds"),
    "minprocs": (in_range(parse_int, 1, 1 << 22), "minprocs"),
    "directory": (str, "directory"),
    "environment": (parse_environment, "environment"),
    "nodaemon": (parse_bool, None),
    "nocleanup": (parse_bool, None),
}
# [supervisord] keys with no effect here, and what the user should know
SUPERVISORD_IGNORED = {
    "logfile_maxbytes": "the supervisor's own log is not rotated; rotate it with logrotate and SIGUSR1",
    "logfile_backups": "the supervisor's own log is not rotated; rotate it with logrotate and SIGUSR1",
    "user": "respawn does not switch user: start it as that user (each program's user = works)",
    "identifier": "there is no XML-RPC interface to identify",
    "silent": "the supervisor's own lines still go to stderr",
    "strip_ansi": "output is kept as the program wrote it",
}
# sections that only serve supervisorctl and XML-RPC: respawn has its own socket
SUPERVISORD_INFO_SECTIONS = ("supervisorctl", "unix_http_server", "inet_http_server", "rpcinterface:")
# the rest of supervisord's sections that respawn does not run (yet)
SUPERVISORD_SECTIONS = ()
# The settings [supervisord] may fill beyond RESPAWN_KEYS: None = leave as it is.
PROCESS_SETTINGS = {"umask": None, "minfds": None, "minprocs": None, "directory": None,
                    "environment": {}}

# supervisord's event types: name -> the abstract type it belongs to (None: a root).
# A listener subscribed to a type gets every event of the types below it.
EVENT_TYPES = {
    "EVENT": None,
    "PROCESS_STATE": "EVENT", "PROCESS_STATE_STOPPED": "PROCESS_STATE",
    "PROCESS_STATE_EXITED": "PROCESS_STATE", "PROCESS_STATE_STARTING": "PROCESS_STATE",
    "PROCESS_STATE_STOPPING": "PROCESS_STATE", "PROCESS_STATE_BACKOFF": "PROCESS_STATE",
    "PROCESS_STATE_FATAL": "PROCESS_STATE", "PROCESS_STATE_RUNNING": "PROCESS_STATE",
    "PROCESS_STATE_UNKNOWN": "PROCESS_STATE",
    "PROCESS_COMMUNICATION": "EVENT", "PROCESS_COMMUNICATION_STDOUT": "PROCESS_COMMUNICATION",
    "PROCESS_COMMUNICATION_STDERR": "PROCESS_COMMUNICATION",
    "PROCESS_LOG": "EVENT", "PROCESS_LOG_STDOUT": "PROCESS_LOG", "PROCESS_LOG_STDERR": "PROCESS_LOG",
    "REMOTE_COMMUNICATION": "EVENT",
    "SUPERVISOR_STATE_CHANGE": "EVENT", "SUPERVISOR_STATE_CHANGE_RUNNING": "SUPERVISOR_STATE_CHANGE",
    "SUPERVISOR_STATE_CHANGE_STOPPING": "SUPERVISOR_STATE_CHANGE",
    "TICK": "EVENT", "TICK_5": "TICK", "TICK_60": "TICK", "TICK_3600": "TICK",
    "PROCESS_GROUP": "EVENT", "PROCESS_GROUP_ADDED": "PROCESS_GROUP",
    "PROCESS_GROUP_REMOVED": "PROCESS_GROUP",
}
# what respawn never sends (it has no XML-RPC, no capture mode, no log or group events yet)
EVENTS_NEVER_SENT = ("PROCESS_COMMUNICATION", "REMOTE_COMMUNICATION", "PROCESS_GROUP",
                     "PROCESS_STATE_UNKNOWN", "PROCESS_LOG")
DEFAULT_RESULT_HANDLER = "supervisor.dispatchers:default_handler"


def parse_events(text):
    names = tuple(parse_list(text))
    if not names:
        raise ValueError("expected one or more event types, e.g. PROCESS_STATE_FATAL")
    for name in names:
        if name not in EVENT_TYPES:
            raise ValueError("unknown event type %r%s" % (name, did_you_mean(name, EVENT_TYPES)))
    return names


# [eventlistener:NAME]: a program whose stdin and stdout speak supervisord's
# event listener protocol, plus the keys of its pool
LISTENER_KEYS = dict(PROGRAM_KEYS, events=(parse_events, None),
                     buffer_size=(in_range(parse_int, 1, 1000000), 10),
                     result_handler=(str, DEFAULT_RESULT_HANDLER))

# Keys that shape the running process: a change to one of them restarts the
# service on reload.  Everything else is policy, applied to the running process.
PROCESS_KEYS = ("command", "directory", "environment", "user", "group", "umask", "redirect_stderr")


def _where(self, key=None):
    """(file, line) of a key of a section or of its program (their lines: see
    _Section), or of the section when the key is not written."""
    at = self.lines.get(key)
    if at is None:
        return self.file, self.line
    return (self.file, at) if isinstance(at, int) else tuple(at)


class Program:
    """One service: a [program:NAME] section, or one of its numprocs instances, typed.
    Plain data; `raw` keeps the text for diffs, `lines` each key's (file, line)."""

    # the defaults are class attributes (set below the class): an instance holds
    # only the keys its section sets, ~600 bytes less per program (3 MiB at 5000)
    events = None                 # a listener's event types; None for a program
    pool = None                   # a listener's [eventlistener:NAME]
    buffer_size = 10

    def __init__(self, name, values, raw, file=None, line=None, lines=None):
        self.program_name = self.group_name = name
        self.process_num = 0
        self.__dict__.update(values)
        self.name, self.raw, self.file, self.line = name, raw, file, line
        self.lines = lines or {}

    where = _where

    def shape(self):
        """What a reload compares to decide whether the process must restart."""
        pipes = tuple(self.stream_target(s) == "none" for s in ("stdout", "stderr"))
        notify = self.ready[0] == "notify"
        # the environment as typed too: [supervisord] environment is part of it
        return (tuple(self.raw.get(k) for k in PROCESS_KEYS), pipes, notify,
                self.watchdog if notify else 0, tuple(sorted(self.environment.items())))

    def stream_target(self, stream):
        """'prefix' (the supervisor's own stdout/stderr), 'none', or a file path or 'auto'."""
        if stream == "stderr" and self.redirect_stderr:
            return "merged"
        target = getattr(self, stream + "_logfile")
        return "prefix" if target is None else target


for _key, _default in PROGRAM_DEFAULTS.items():
    setattr(Program, _key, _default)
del _key, _default


class Config:
    """A whole config: the [respawn] settings, programs, and the text of every file read."""

    def __init__(self, path, settings, programs, files, warnings, sections=(), groups=None):
        self.path, self.settings, self.programs = path, settings, programs
        self.files, self.warnings = files, warnings
        # [file, name, line, {key: text}, {key: [file, line]}, supervisord?] for every
        # section as read: a re-exec hands them over, so the new image types them
        # without parsing the INI again
        self.sections = sections
        # name -> [service names]: each program's instances and each [group:x]'s
        # members, for NAME:* and a group name in client commands
        self.groups = groups or {}

    def digest(self):
        h = sha256()
        for path in sorted(self.files):
            h.update(path.encode() + b"\0" + self.files[path].encode() + b"\0")
        return h.hexdigest()


def expand_names(config, patterns, known=None):
    """Client names -> (service names in order, no repeats; the patterns that match
    nothing).  A pattern is a service, NAME:* (a program's instances or a group's
    members), a group name, GROUP:NAME (supervisorctl's form) or all.  known: the
    services that exist (default the config's programs)."""
    known = config.programs if known is None else known
    names, unknown = [], []
    for pattern in patterns:
        pattern = str(pattern)
        group, colon, member = pattern.partition(":")
        if pattern == "all":
            found = list(known)
        elif pattern in known:
            found = [pattern]
        elif not colon and group in config.groups:
            found = config.groups[group]
        elif colon and member == "*" and group in config.groups:
            found = config.groups[group]
        elif colon and group in config.groups and member in config.groups[group]:
            found = [member]
        else:
            unknown.append(pattern)
            continue
        names.extend(n for n in found if n in known)
    return list(dict.fromkeys(names)), unknown


# An inline comment starts at the first ';' (or '#') at the start of the line or
# after whitespace, as configparser finds it since 3.13.  (Before, its round-by-
# round search cut "a;b;c ;d #e" at '#', not at the earlier ' ;': a quirk of
# the Python that ran supervisord, not a rule to keep.)
_INLINE_COMMENT = {(";",): re.compile(r"(?:^|(?<=\s));"), (";", "#"): re.compile(r"(?:^|(?<=\s))[;#]")}


def _comment_start(line, prefixes):
    m = _INLINE_COMMENT[prefixes].search(line)
    return m.start() if m else None


def _parse_ini(text, supervisord):
    """INI text -> ([[section, line, {key: text}, {key: line}]], [(line, level, message)]),
    level: warning, error (read on), fatal (the file cannot be used).

    configparser's syntax as respawn reads it (strict: a repeated key or section is an
    error; inline comments after whitespace with ';'; no DEFAULT section), or as
    supervisord reads it (';' and '#'; a repeated key or section: the last value wins,
    with a warning; blank lines kept in a continued value).  One linear pass:
    configparser's option pattern, and our scan for key lines, took 12 s on a line
    with a long run of spaces.  A key outside any section stops the file, as there."""
    prefixes = (";", "#") if supervisord else (";",)
    sections, problems, seen = [], [], {}
    values = lines = key = None
    indent = 0
    if "\r" in text:           # as a file opened in text mode reads it (universal newlines)
        text = text.replace("\r\n", "\n").replace("\r", "\n")
    for number, line in enumerate(text.split("\n"), 1):
        stripped = line.strip()
        if stripped[:1] in ("#", ";"):
            value, had_comment = "", True
        else:
            cut = _comment_start(line, prefixes)
            had_comment = cut is not None
            value = line[:cut].strip()
        if not value:
            if not supervisord:
                key = None                    # a blank line ends a value
            elif key is not None and not had_comment:
                values[key].append("")
            continue
        level = len(line) - len(line.lstrip()) if line[:1].isspace() else 0
        if key is not None and level > indent:
            values[key].append(value)         # a continuation line
            continue
        indent, key = level, None
        close = value.rfind("]")
        if value[0] == "[" and close >= 2:
            name = value[1:close]
            if name in seen and not supervisord:
                problems.append((number, "error", "section [%s] appears twice (keep one)" % name))
                key = None
                values, lines = {}, {}        # read on, into nothing
                continue
            if name in seen:
                problems.append((number, "warning", "section [%s] appears again (first at line %d): "
                                 "its keys are merged, the last value of each wins, as in supervisord"
                                 % (name, seen[name])))
            seen.setdefault(name, number)
            values, lines = {}, {}
            sections.append([name, number, values, lines])
            continue
        if values is None:
            problems.append((number, "fatal", "a key outside any section: %s (put it under "
                             "[respawn] or [program:NAME])" % _cut(stripped)))
            break
        cut, colon = value.find("="), value.find(":")
        if cut < 0 or 0 <= colon < cut:
            cut = colon
        # interned: one string per key name, not one per key of every section
        name = sys.intern(value[:cut].rstrip().lower()) if cut > 0 else ""
        if not name:
            problems.append((number, "fatal", "cannot read this line: %s (expected key = value "
                             "or [section])" % _cut(stripped)))
            continue
        if name in values:
            if not supervisord:
                problems.append((number, "error", "key %s appears twice in [%s] (keep one)"
                                 % (_cut(name), sections[-1][0])))
                continue
            problems.append((number, "warning", "key %s appears again in [%s] (line %d before): "
                             "the last value wins, as in supervisord" % (_cut(name), sections[-1][0],
                                                                         lines[name])))
        values[name] = [value[cut + 1:].strip()]
        lines[name] = number
        key = name
    for name, number, values, lines in sections:
        for k in values:
            values[k] = "\n".join(values[k]).rstrip()
    return sections, problems


_EXPANSION = re.compile(r"%(?:(%)|\(([^()]*)\)([-#0 +]*)([0-9]*)(?:\.([0-9]*))?([A-Za-z]?))?")


def _interpolate(value, names, fail, strict=False, env=None):
    """supervisord's expansions: %(here)s, %(program_name)s, %(process_num)02d (any
    printf flags and width), %(ENV_X)s (env: the program's own environment first,
    then ours) ...  strict (a supervisord file): a lone % is an error, as there."""
    if "%" not in value:
        return value

    def repl(m):
        pct, name, flags, width, precision, conv = m.groups()
        if pct:
            return "%"
        if name is None:
            if strict:
                fail("a lone %% in %s: write %%%% for a literal %% (supervisord's rule)" % _cut(value))
            return "%"
        if name.startswith("ENV_") and name not in names:
            found = (env or {}).get(name[4:], os.environ.get(name[4:]))
            if found is None:
                fail("environment variable %s is not set (in %%(%s)s)" % (_cut(name[4:], 40)[1:-1], name))
                return m.group(0)
        elif name in names:
            found = names[name]
        else:
            fail("unknown expansion %%(%s)s (expected ENV_NAME, here, program_name, process_num, "
                 "numprocs, group_name or host_node_name)" % _cut(name, 40)[1:-1])
            return m.group(0)
        if not conv or conv not in "diouxXeEfFgGcrsa" or len(width) > 3 or len(precision or "") > 3:
            fail("cannot expand %s: expected a conversion such as s, d or 02d" % _cut(m.group(0)))
            return m.group(0)
        spec = "%" + flags + width + ("." + precision if precision is not None else "") + conv
        try:
            return spec % (found,)
        except (TypeError, ValueError, OverflowError) as exc:
            fail("cannot expand %s: %s" % (_cut(m.group(0)), exc))
            return m.group(0)
    return _EXPANSION.sub(repl, value)


def _read_text(path):
    """A config file's text.  Only a regular file, and only so much of it: a FIFO
    would block the read forever, /dev/zero never ends, and opening some devices
    acts (a tape rewinds), so the type is checked before the open."""
    st = os.stat(path)
    if stat.S_ISDIR(st.st_mode):
        raise OSError(errno.EISDIR, "it is a directory, not a file")
    if not stat.S_ISREG(st.st_mode):
        raise OSError(errno.EINVAL, "it is not a regular file (a FIFO, a device or a socket)")
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC | getattr(os, "O_NOCTTY", 0))
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):     # swapped since the stat
            raise OSError(errno.EINVAL, "it is not a regular file")
        chunks, size = [], 0
        while size <= MAX_CONFIG_BYTES:
            chunk = os.read(fd, MAX_CONFIG_BYTES + 1 - size)
            if not chunk:
                break
            chunks.append(chunk)
            size += len(chunk)
    finally:
        os.close(fd)
    if size > MAX_CONFIG_BYTES:
        raise OSError(errno.EFBIG, "it is larger than %d MiB" % (MAX_CONFIG_BYTES >> 20))
    return b"".join(chunks).decode("utf-8")


class _Section:
    """One section as read: where it is, its keys as text and their lines."""

    def __init__(self, file, name, line, values, lines, supervisord):
        self.file, self.name, self.line = file, name, line
        self.values = values          # key -> text
        # key -> its line in this file, or (file, line) for a key merged from another
        # file (a handoff of format 2 carried every one so, as a list); shared by its
        # programs.  A (file, line) tuple per key was 1.1 MiB at 5000 programs.
        self.lines = lines
        self.supervisord = supervisord

    where = _where

    def carried(self):
        return [self.file, self.name, self.line, self.values, self.lines, self.supervisord]


_SUPERVISORD_HEADER = re.compile(r"^[ \t]*\[supervisord\]", re.M)


class _Loader:
    """Reads a config and its includes; collects every error before giving up."""

    def __init__(self, read):
        self.read = read
        self.errors, self.warnings = [], []
        self.files = {}          # path -> text, in reading order
        self.sections = []       # _Section, in reading order
        self.too_many = False

    def error(self, message, file=None, line=None):
        self.errors.append(ConfigError(message, file, line))

    def warn(self, message, file=None, line=None, level="warning"):
        self.warnings.append(ConfigError(message, file, line, level))

    def load(self, path, stack=(), line=None, supervisord=False):
        """line: of the [include] files key that named this file, for errors.
        supervisord: included by a supervisord file, so read as one."""
        path = os.path.abspath(path)
        where = (stack[-1], line) if stack else (path, None)
        if path in stack:
            chain = " -> ".join(os.path.basename(p) for p in stack + (path,))
            self.error("include loop: %s" % chain, *where)
            return
        if len(stack) > MAX_INCLUDE_DEPTH:
            self.error("includes nested more than %d deep (at %s)" % (MAX_INCLUDE_DEPTH, _cut(path)), *where)
            return
        if len(self.files) >= MAX_CONFIG_FILES:
            if not self.too_many:
                self.error("more than %d config files (includes counted)" % MAX_CONFIG_FILES, *where)
            self.too_many = True
            return
        try:
            text = self.read(path)
        except OSError as exc:
            self.error("cannot read the config%s: %s" % (
                " %s" % _cut(path) if stack else "", exc.strerror or exc), *where)
            return
        except UnicodeDecodeError as exc:
            # the line of the byte, not its offset
            data = exc.object if isinstance(exc.object, bytes) else b""
            number = data.count(b"\n", 0, exc.start) + 1
            column = exc.start - (data.rfind(b"\n", 0, exc.start) + 1) + 1
            self.error("cannot read the config: 'utf-8' codec can't decode byte 0x%02x at column %d "
                       "(save the file as UTF-8)" % (data[exc.start] if data else 0, column), path, number)
            return
        self.files[path] = text
        if "\0" in text:
            self.error("a NUL byte in the config (is it a text file?)", path, text.count("\n", 0, text.index("\0")) + 1)
            return
        supervisord = supervisord or bool(_SUPERVISORD_HEADER.search(text))
        found, problems = _parse_ini(text, supervisord)
        includes = []
        for number, level, message in problems:
            if level == "warning":
                self.warn(message, path, number)
            else:
                self.error(message, path, number)
        if any(level == "fatal" for _, level, _ in problems):
            return
        for name, sline, values, lines in found:
            section = _Section(path, name, sline, values, lines,
                               supervisord)
            if supervisord and name != "include":
                # supervisord puts %(here)s in as it reads each file: merged sections keep theirs
                here = os.path.dirname(path)
                for key, text in values.items():
                    if "%(here)s" in text:
                        values[key] = text.replace("%(here)s", here)
            self.sections.append(section)
            if name == "include":
                includes.append(section)
                if not supervisord:
                    self.include(section, stack + (path,))
        if supervisord:
            # supervisord reads the files it includes after the whole file: their
            # keys come later, and win a merge
            for section in includes:
                self.include(section, stack + (path,))

    def include(self, section, stack):
        path, values = section.file, section.values
        for key in values:
            if key != "files":
                self.error("unknown key %s in [include]%s" % (_cut(key), did_you_mean(key, ["files"])),
                           *section.where(key))
        where = section.where("files")
        pattern_text = _interpolate(values.get("files", ""), {"here": os.path.dirname(path),
                                                              "host_node_name": os.uname().nodename},
                                    lambda m: self.error(m, *where))
        import glob
        for pattern in parse_list(pattern_text):
            full = os.path.join(os.path.dirname(path), os.path.expanduser(pattern))
            matches = sorted(glob.glob(full))
            if not matches and section.supervisord:
                self.warn("no file matches the include %s" % _cut(pattern), *where)
            for found in matches:
                self.load(found, stack, where[1], section.supervisord)


# The form of Config.sections in a handoff state: a new image that reads them
# otherwise parses the carried config text instead.
SECTIONS_FORMAT = 3           # 3: a key's line as a number (2: [file, line]), read alike


def _merge_sections(loader):
    """supervisord reads every file into one parser: a section that appears again
    (in the same file or another) gets its keys merged, the last value winning.
    In a respawn file a repeated section stays an error."""
    merged, out, files, copied = {}, [], set(), set()
    for section in loader.sections:
        if section.name == "include":
            continue
        first = merged.get(section.name)
        if first is None:
            # the section as read, copied only if another is merged into it (rare;
            # a copy of each was ~2 us a section)
            merged[section.name] = first = section
            files.add((section.name, section.file))
            out.append(first)
        elif section.supervisord:
            if (section.name, section.file) not in files:    # within a file the reader said so
                files.add((section.name, section.file))
                loader.warn("[%s] appears again (first at %s:%d): its keys are merged, the last "
                            "value of each wins, as in supervisord" % (section.name, first.file, first.line),
                            section.file, section.line)
            if section.name not in copied:
                copied.add(section.name)
                copy = merged[section.name] = _Section(*first.carried())
                out[out.index(first)] = first = copy
            first.values = dict(first.values, **section.values)
            first.lines = dict(first.lines, **{k: section.where(k) for k in section.lines})
        elif section.name.startswith("program:"):
            loader.error("[%s] is already defined at %s:%s" % (section.name, first.file, first.line),
                         section.file, section.line)
        elif section.name == "respawn":
            loader.error("[respawn] is already defined in %s (keep one)" % first.file,
                         section.file, section.line)
        else:
            loader.error("section [%s] appears twice (first at %s:%s; keep one)"
                         % (section.name, first.file, first.line), section.file, section.line)
    return out


def load_config(path, machine_checks=False, read=_read_text, carried=None):
    """Parse a config file and its includes into a Config; ConfigErrors on any mistake.

    machine_checks adds what depends on this machine (commands, directories,
    users): errors for `check`, but for `run` only the one service fails.
    carried: {"files", "sections"} of a Config read before (a re-exec), used
    instead of reading and parsing the files."""
    loader = _Loader(read)
    if carried is None:
        loader.load(path)
    else:
        loader.files = dict(carried["files"])
        loader.sections = [_Section(*entry) for entry in carried["sections"]]
    err, warn = loader.error, loader.warn
    settings = {k: d for k, (_, d) in RESPAWN_KEYS.items()}
    settings.update((k, dict(v) if isinstance(v, dict) else v) for k, v in PROCESS_SETTINGS.items())
    sections = _merge_sections(loader)
    kinds = {}                   # "supervisord", "respawn", "program:", "group:" ... -> sections
    for section in sections:
        kind = section.name.split(":", 1)[0] + ":" if ":" in section.name else section.name
        kinds.setdefault(kind, []).append(section)
    node = os.uname().nodename
    for section in kinds.get("supervisord", ()):
        _supervisord_settings(section, settings, err, warn, node)
    for section in kinds.get("respawn", ()):
        _typed_keys(section, RESPAWN_KEYS, settings, {"here": os.path.dirname(section.file)}, err, warn)
    group_of, groups, group_priority = _groups(kinds.get("group:", ()), kinds, err, warn)
    programs, instances = {}, {}
    alike = {}                   # a section's texts -> the program they typed to, without a word said
    for section in kinds.get("program:", []) + kinds.get("eventlistener:", []):
        if len(programs) >= MAX_SERVICES:
            err("more than %d services (numprocs counted)" % MAX_SERVICES, section.file, section.line)
            break
        listener = section.name.startswith("eventlistener:")
        shape = None if listener else _section_shape(section, group_of, group_priority)
        typed = alike.get(shape[2]) if shape is not None else None
        if typed is not None:
            found = [_program_like(typed, section, *shape[:2])]
        else:
            said = len(loader.errors) + len(loader.warnings)
            found = _programs(section, settings, group_of, group_priority, node, err, warn,
                              LISTENER_KEYS if listener else PROGRAM_KEYS)
            if shape is not None and len(found) == 1 and said == len(loader.errors) + len(loader.warnings):
                alike[shape[2]] = found[0]
        if listener and found and not _check_listener(section, found, err, warn):
            continue
        for prog in found:
            other = programs.get(prog.name)
            if other is not None:
                err("service %r of [%s] is also a service of [program:%s] (at %s:%s); names must "
                    "differ" % (prog.name, section.name, other.program_name, other.file, other.line),
                    *prog.where("process_name"))
                continue
            programs[prog.name] = prog
            instances.setdefault(prog.program_name, []).append(prog.name)
    for group, members in groups.items():
        groups[group] = [n for m in members for n in instances.get(m, ())]
    for name, names in instances.items():
        groups.setdefault(name, names)
    for kind, found in kinds.items():
        if kind not in ("respawn", "supervisord", "program:", "group:", "eventlistener:"):
            for section in found:
                _other_section(section, err, warn)
    for prog in programs.values():
        prog.requires = _expand_requires(prog, programs, groups)
    for prog in programs.values():
        _check_program(prog, programs, err, loader.warnings)
    _check_requires(programs, err)
    if machine_checks:
        seen = set()
        for prog in programs.values():
            for key, problem in machine_problems(prog):
                where = prog.where(key)
                message = "[program:%s] %s" % (prog.name, problem)
                if (where, problem) not in seen:    # numprocs instances share their mistakes
                    seen.add((where, problem))
                    err(message, *where)
        directory = settings["directory"]
        if directory and not os.path.isdir(directory):
            section = kinds["supervisord"][0]
            err("[supervisord] directory %s does not exist" % _cut(directory),
                *section.where("directory"))
        for key, problem in ops_machine_problems(settings, os.path.abspath(path)):
            # the key's line: [respawn] wins over [supervisord] (read first), as for its value
            where = [s.where(key) for s in kinds.get("supervisord", []) + kinds.get("respawn", [])
                     if key in s.lines]
            err(problem, *(where[-1] if where else (None, None)))
    if loader.errors:
        exc = ConfigErrors(loader.errors, loader.warnings)
        exc.settings = settings
        raise exc
    return Config(os.path.abspath(path), settings, programs, loader.files, loader.warnings,
                  [s.carried() for s in loader.sections], groups)


def _typed_keys(section, table, target, names, err, warn, strict=False, env=None, lax=False):
    """Each key of a section typed into target; raw texts returned.  lax (a
    supervisord file): an unknown key is a warning, as supervisord ignores it."""
    raw = {}
    for key, text in section.values.items():
        where = section.where(key)
        if key not in table:
            if table is PROGRAM_KEYS and key in SUPERVISORD_KEYS:
                warn("%r is a supervisord key that respawn does not implement; ignored" % key, *where)
            elif lax:
                warn("unknown key %s in [%s]%s; ignored, as supervisord does"
                     % (_cut(key), section.name, did_you_mean(key, table)), *where)
            else:
                err("unknown key %s in [%s]%s" % (_cut(key), section.name, did_you_mean(key, table)), *where)
            continue
        text = _interpolate(text, names, lambda m: err(m, *where), strict, env)
        raw[key] = text
        try:
            target[key] = table[key][0](text)
        except ValueError as exc:
            err("%s: %s" % (key, exc), *where)
    return raw


def _supervisord_settings(section, settings, err, warn, node):
    """[supervisord]: each key mapped to respawn's setting, or warned about by name."""
    where = section.where
    names = {"here": os.path.dirname(section.file), "host_node_name": node}
    for key, text in section.values.items():
        if key == "user" and text.strip() in _own_user():
            continue          # already so: the usual user=root of a container
        if key in SUPERVISORD_IGNORED:
            warn("[supervisord] %s has no effect here: %s" % (key, SUPERVISORD_IGNORED[key]), *where(key))
            continue
        if key not in SUPERVISORD_SETTINGS:
            warn("unknown key %s in [supervisord]%s; ignored" % (
                _cut(key), did_you_mean(key, list(SUPERVISORD_SETTINGS) + list(SUPERVISORD_IGNORED))),
                *where(key))
            continue
        parse, setting = SUPERVISORD_SETTINGS[key]
        text = _interpolate(text, names, lambda m: err(m, *where(key)), True)
        try:
            value = parse(text)
        except ValueError as exc:
            err("%s: %s" % (key, exc), *where(key))
            continue
        if key == "nodaemon" and not value:
            warn("[supervisord] nodaemon = false: respawn stays in the foreground unless started "
                 "with run --daemon", *where(key), level="info")
        if setting:
            settings[setting] = value


def _own_user():
    import pwd
    uid = os.geteuid()
    try:
        return (str(uid), pwd.getpwuid(uid).pw_name)
    except KeyError:
        return (str(uid),)


def _groups(sections, kinds, err, warn):
    """[group:x] programs = a, b: ({program: group}, {group: [programs]}, {group: priority})."""
    group_of, groups, priority = {}, {}, {}
    defined = {s.name[len("program:"):].strip() for s in kinds.get("program:", ())}
    for section in sections:
        gname = section.name[len("group:"):].strip()
        where = section.where
        if not re.match(r"[^\s:/%]+\Z", gname):
            err("group name %s may not hold whitespace, ':', '/' or '%%'" % _cut(gname), section.file, section.line)
            continue
        values = {}
        _typed_keys(section, {"programs": (parse_list, ()), "priority": PROGRAM_KEYS["priority"]},
                    values, {"here": os.path.dirname(section.file)}, err, warn, section.supervisord,
                    lax=section.supervisord)
        members = []
        for member in values.get("programs", ()):
            if member not in defined:
                err("[group:%s] names %r, which is not a [program:NAME]%s"
                    % (gname, member, did_you_mean(member, defined)), *where("programs"))
            elif member in group_of:
                err("[group:%s] names %r, which is already in [group:%s]"
                    % (gname, member, group_of[member]), *where("programs"))
            else:
                group_of[member] = gname
                members.append(member)
        groups[gname] = members
        if "priority" in values:
            priority[gname] = values["priority"]
    return group_of, groups, priority


# What a [program:x] section's one program depends on besides its keys' texts,
# when no text holds a % (so nothing is interpolated: its name, folder and
# group do not show in any value) and it names no process_name or numprocs:
# 5000 sections alike (a handoff types the carried sections) are typed once,
# ~15 us each after that instead of ~20 us a key (each one's name, file and
# lines are its own; a section that gets any error or warning is typed alone).
_SHAPED_OUT = frozenset(("process_name", "numprocs", "numprocs_start"))
PROGRAM_NAME = {True: r"[^\s:/%]+\Z", False: r"[A-Za-z0-9_.@-]+\Z"}   # by section.supervisord


def _section_shape(section, group_of, group_priority):
    """None, or (program name, group, what its typed program depends on)."""
    texts = section.values
    if _SHAPED_OUT.intersection(texts) or any("%" in text for text in texts.values()):
        return None
    pname = section.name.split(":", 1)[1].strip()
    if not re.match(PROGRAM_NAME[section.supervisord], pname):
        return None           # typed alone, to say so at its line
    group = group_of.get(pname, pname)
    return pname, group, (section.supervisord, group_priority.get(group), tuple(texts.items()))


def _program_like(typed, section, pname, group):
    """The program of a section whose texts typed to `typed` (see _section_shape)."""
    prog = Program(pname, typed.__dict__, typed.raw, section.file, section.line, section.lines)
    prog.program_name, prog.group_name = pname, group
    if "environment" in typed.__dict__:
        prog.environment = dict(typed.environment)      # its own: nothing shares a mutable value
    return prog


def _programs(section, settings, group_of, group_priority, node, err, warn, table=PROGRAM_KEYS):
    """A [program:x] section's services: one, or numprocs instances named by process_name.
    table: its keys (a section kind that is a program with more keys passes its own)."""
    pname = section.name.split(":", 1)[1].strip()
    sup = section.supervisord
    valid = PROGRAM_NAME[sup]
    if not re.match(valid, pname):
        err("program name %s may hold only %s" % (_cut(pname), "no whitespace, ':', '/' or '%'" if sup
                                                  else "letters, digits and _ . @ -"),
            section.file, section.line)
        return []
    texts = section.values
    if "command" not in texts:
        err("[%s] has no command (add command = /path/to/program args)" % section.name,
            section.file, section.line)
        return []
    where = section.where
    group = group_of.get(pname, pname)
    names = {"here": os.path.dirname(section.file), "program_name": pname, "group_name": group,
             "host_node_name": node}
    counts = {}
    for key in ("numprocs", "numprocs_start"):
        if key in texts:
            try:
                counts[key] = table[key][0](_interpolate(texts[key], names, lambda m: None, sup))
            except ValueError as exc:
                err("%s: %s" % (key, exc), *where(key))
    numprocs, start = counts.get("numprocs", 1), counts.get("numprocs_start", 0)
    template = texts.get("process_name", "%(program_name)s")
    if numprocs > 1 and "%(process_num)" not in template:
        err("numprocs = %d needs %%(process_num) in process_name, as in supervisord (e.g. "
            "process_name = %%(program_name)s_%%(process_num)02d)" % numprocs, *where(
                "process_name" if "process_name" in texts else "numprocs"))
        numprocs = 1          # the section's other mistakes are still worth saying
    defaults = dict(SUPERVISORD_DEFAULTS) if sup else {}
    if sup and "stopasgroup" in texts and "killasgroup" not in texts:
        defaults["killasgroup"] = None       # supervisord: killasgroup follows stopasgroup
    out = []
    for num in range(start, start + numprocs):
        first = num == start                 # an instance's mistakes are its siblings': say them once
        fail = err if first else (lambda *a: None)
        names.update(process_num=num, numprocs=numprocs)
        values = dict(defaults)
        env = dict(settings["environment"])
        if "environment" in texts:
            try:
                own = parse_environment(_interpolate(texts["environment"], names, lambda m: fail(
                    m, *where("environment")), sup, settings["environment"]))
            except ValueError as exc:
                fail("environment: %s" % exc, *where("environment"))
                own = {}
            env.update(own)
        raw = {}
        for key, text in texts.items():
            kwhere = where(key)
            if key not in table:
                if first:
                    if key in SUPERVISORD_KEYS:
                        warn("%r is a supervisord key that respawn does not implement; ignored" % key, *kwhere)
                    elif sup:
                        warn("unknown key %s in [%s]%s; ignored, as supervisord does"
                             % (_cut(key), section.name, did_you_mean(key, table)), *kwhere)
                    else:
                        err("unknown key %s in [%s]%s" % (_cut(key), section.name,
                                                         did_you_mean(key, table)), *kwhere)
                continue
            if key == "environment":
                raw[key] = text
                values[key] = env
                continue
            if key == "process_name":
                continue          # named below, once the environment is known
            if key in ("numprocs", "numprocs_start"):
                raw[key] = text
                values[key] = counts.get(key, PROGRAM_DEFAULTS[key])
                continue
            text = _interpolate(text, names, lambda m: fail(m, *kwhere), sup, env)
            if sup and key in ("directory", "stdout_logfile", "stderr_logfile"):
                text = os.path.expanduser(text)
            raw[key] = text
            try:
                values[key] = table[key][0](text)
            except ValueError as exc:
                fail("%s: %s" % (key, exc), *kwhere)
        if "environment" not in texts and env:
            values["environment"] = env
        if values.get("killasgroup", True) is None:
            values["killasgroup"] = values.get("stopasgroup", False)
        if sup and values.get("stopasgroup") and values.get("killasgroup") is False:
            fail("stopasgroup = true needs killasgroup = true (supervisord refuses this too)",
                 *where("killasgroup"))
        if group in group_priority:
            values["priority"] = group_priority[group]
        for stream in ("stdout", "stderr"):
            target = values.get(stream + "_logfile")
            if isinstance(target, str) and target.startswith(("/dev/", "/proc/")):
                # /dev/stdout is never rotated: the rename would move the device's
                # name for everyone (supervisord fails there with "Illegal seek")
                values[stream + "_logfile_maxbytes"] = 0
        name = _interpolate(template.strip(), names, lambda m: fail(m, *where("process_name")), sup, env)
        if not re.match(valid, name):
            fail("process_name %s gives the name %s, which may hold only %s"
                 % (_cut(template), _cut(name), "no whitespace, ':', '/' or '%'" if sup
                    else "letters, digits and _ . @ -"), *where("process_name"))
            return out
        values.update(program_name=pname, group_name=group, process_num=num)
        if raw == texts:
            raw = texts       # the section's own dict, not an equal one (0.3 MiB at 5000 programs)
        out.append(Program(name, values, raw, section.file, section.line, section.lines))
    return out


def _other_section(section, err, warn):
    """Every section that is neither [respawn], [supervisord], [program:x] nor [group:x]."""
    name, where = section.name, (section.file, section.line)
    if name.startswith(SUPERVISORD_INFO_SECTIONS):
        warn("[%s] serves supervisorctl and XML-RPC; respawn's commands use its own control "
             "socket (python3 respawn.py status); ignored" % name, *where, level="info")
    elif name.startswith("fcgi-program:"):
        warn("[%s]: fcgi-program is not implemented; program %s will not be started"
             % (name, name.split(":", 1)[1].strip()), *where)
    elif name.startswith(SUPERVISORD_SECTIONS):
        warn("[%s] is a supervisord section that respawn does not use; ignored" % name, *where)
    elif section.supervisord:
        warn("unknown section [%s]; ignored, as supervisord does" % _cut(name, 80)[1:-1], *where)
    else:
        choices = ["respawn", "include", "program:" + name.split(":")[-1]]
        err("unknown section [%s]%s" % (_cut(name, 80)[1:-1], did_you_mean(name, choices)
                                         or " (expected [respawn], [include] or [program:NAME])"), *where)


def _expand_requires(prog, programs, groups):
    """requires may name a service, a program (all its instances) or a group."""
    names = []
    for req in prog.requires:
        if req in programs or req == prog.name or req not in groups:
            names.append(req)          # _check_program judges it
        else:
            names.extend(n for n in groups[req] if n != prog.name)
    return tuple(dict.fromkeys(names))


def _check_listener(section, instances, err, warn):
    """What supervisord refuses or ignores in an [eventlistener:x], said once for
    its instances; False if they cannot run."""
    where = section.where
    pool = section.name.split(":", 1)[1].strip()
    first = instances[0]
    if "events" not in section.values:
        err("[%s] has no events (add events = PROCESS_STATE_FATAL, or another event type)"
            % section.name, section.file, section.line)
        return False
    if first.redirect_stderr:
        # its stdout is the protocol channel: stderr mixed in would break it
        err("[%s] sets redirect_stderr = true, which a listener cannot (its stdout speaks "
            "the listener protocol)" % section.name, *where("redirect_stderr"))
        return False
    never = [e for e in first.events or () if e.startswith(EVENTS_NEVER_SENT)]
    if never:
        warn("[%s] subscribes to %s, which respawn never sends" % (section.name, ", ".join(never)),
             *where("events"))
    handler = section.values.get("result_handler", DEFAULT_RESULT_HANDLER).strip()
    if handler != DEFAULT_RESULT_HANDLER:
        warn("[%s] result_handler %s is not run (no Python plugins here): a result OK "
             "acknowledges an event, any other result sends it again" % (section.name, handler),
             *where("result_handler"))
    for prog in instances:
        prog.pool = pool
        if "priority" not in section.values:
            prog.priority = -1        # supervisord's: listeners start first and stop last
    return True

def _check_program(prog, programs, err, warnings):
    at = prog.where
    if prog.backoff <= 0 or prog.backoff_max < prog.backoff:
        err("[program:%s] backoff must be > 0 and backoff_max >= backoff" % prog.name,
            *at("backoff" if "backoff" in prog.lines or "backoff_max" not in prog.lines else "backoff_max"))
    if prog.healthcheck_interval <= 0:
        err("[program:%s] healthcheck_interval must be more than 0" % prog.name, *at("healthcheck_interval"))
    if prog.watchdog and prog.ready[0] != "notify":
        err("[program:%s] watchdog needs ready = notify (the service sends WATCHDOG=1)"
            % prog.name, *at("watchdog"))
    for req in prog.requires:
        if req == prog.name:
            err("[program:%s] requires itself" % prog.name, *at("requires"))
        elif req not in programs:
            err("[program:%s] requires %r, which is not a program%s"
                % (prog.name, req, did_you_mean(req, programs)), *at("requires"))
        elif programs[req].priority > prog.priority:
            warnings.append(ConfigError(
                "[program:%s] (priority %d) requires %s (priority %d): requires wins, %s starts "
                "first" % (prog.name, prog.priority, req, programs[req].priority, req), *at("requires")))


def _check_requires(programs, err):
    """A cycle in requires is an error naming the services on it."""
    state = {}

    def visit(name, path):
        # an explicit stack: a chain of thousands of requires would overflow Python's
        # recursion limit
        stack = [(name, iter(programs[name].requires))]
        state[name] = "open"
        while stack:
            current, reqs = stack[-1]
            for req in reqs:
                if req not in programs or req == current:
                    continue
                if state.get(req) == "open":
                    cycle = path[path.index(req):] + [req]
                    err("requires cycle: %s" % " -> ".join(cycle), *programs[current].where("requires"))
                elif req not in state:
                    state[req] = "open"
                    path.append(req)
                    stack.append((req, iter(programs[req].requires)))
                    break
            else:
                stack.pop()
                state[current] = "done"
                path.pop()

    for name in programs:
        if name not in state:
            visit(name, [name])


def is_supervisord_config(config):
    """Is this config a supervisord file (it has a [supervisord] section)?"""
    return any(section[1] == "supervisord" for section in config.sections)


def _id_or_name(text):
    """An all-digit user or group is an id (ASCII digits: '²'.isdigit() is true too)."""
    return int(text) if re.match(r"[0-9]+\Z", text) else None


def resolve_user(prog):
    """(uid, gid, groups, home, username) for a program's user/group, or None; KeyError if unknown."""
    import grp
    import pwd
    if not prog.user and not prog.group:
        return None
    if prog.user:
        uid = _id_or_name(prog.user)
        pw = pwd.getpwuid(uid) if uid is not None else pwd.getpwnam(prog.user)
        uid, gid, home, name = pw.pw_uid, pw.pw_gid, pw.pw_dir, pw.pw_name
    else:
        uid, gid, home, name = os.getuid(), os.getgid(), None, None
    if prog.group:
        gid = _id_or_name(prog.group)
        gid = grp.getgrgid(gid).gr_gid if gid is not None else grp.getgrnam(prog.group).gr_gid
    groups = os.getgrouplist(name, gid) if name else [gid]
    return uid, gid, groups, home, name


def machine_problems(prog):
    """What on this machine stops the program from starting: [(key, message)]."""
    import grp
    import pwd
    problems = []
    for key, lookup_id, lookup_name in (("user", pwd.getpwuid, pwd.getpwnam),
                                        ("group", grp.getgrgid, grp.getgrnam)):
        value = getattr(prog, key)
        if value:
            try:
                num = _id_or_name(value)
                lookup_id(num) if num is not None else lookup_name(value)
            except (KeyError, OverflowError, ValueError):
                problems.append((key, "unknown %s %r" % (key, value)))
    if prog.directory and not os.path.isdir(prog.directory):
        problems.append(("directory", "directory %r does not exist" % prog.directory))
        return problems
    if not prog.command:
        return problems           # a command that did not parse is reported already
    exe = prog.command[0]
    if "/" in exe:
        full = os.path.join(prog.directory or os.getcwd(), exe)
        if not os.path.exists(full):
            problems.append(("command", "command %r not found" % exe))
        elif os.path.isdir(full) or not os.access(full, os.X_OK):
            problems.append(("command", "command %r is not executable" % exe))
    else:
        env_path = prog.environment.get("PATH", os.environ.get("PATH", os.defpath))
        if not which(exe, env_path):
            problems.append(("command", "command %r not found in PATH" % exe))
    return problems


def machine_problem(prog):
    """The first of machine_problems, or None."""
    problems = machine_problems(prog)
    return problems[0][1] if problems else None


def apply_process_settings(settings, log):
    """What [supervisord] asks of the supervisor process itself: umask, the
    descriptor and process limits (raised, never lowered), the working folder.
    Called once at `run`; log(level, message) says what could not be done."""
    if settings.get("umask") is not None:
        os.umask(settings["umask"])
    import resource
    for key, limit in (("minfds", resource.RLIMIT_NOFILE), ("minprocs", getattr(resource, "RLIMIT_NPROC", None))):
        want = settings.get(key)
        if want is None or limit is None:
            continue
        soft, hard = resource.getrlimit(limit)
        if soft != resource.RLIM_INFINITY and soft < want:
            new = want if hard == resource.RLIM_INFINITY else min(want, hard)
            try:
                resource.setrlimit(limit, (new, hard))
            except (OSError, ValueError) as exc:
                log("warn", "%s = %d: cannot raise the limit from %d: %s" % (key, want, soft, exc))
                continue
            if new < want:
                log("warn", "%s = %d: the hard limit is %d; raised to that" % (key, want, hard))
    if settings.get("directory"):
        try:
            os.chdir(settings["directory"])
        except OSError as exc:
            log("error", "cannot change to directory %s: %s" % (settings["directory"], exc.strerror))


# ---------------------------------------------------------------------------
# Service policy: the record, events and effects, and step() that decides
# ---------------------------------------------------------------------------
#
# A service's life is one state machine.  Its record (Service) is plain data;
# step(service, event, now, context) is the only code that changes it, and
# returns what the supervisor must do (effects).  step does no I/O and reads no
# clock: a fake clock and no processes test every transition.  A new transition
# is a case of step; a new kind of input is an event; a new kind of I/O an effect.

UP, DOWN, FORGET = "up", "down", "forget"        # what was asked of a service
# what happens when a stopping process has exited (Service.then)
THEN_START, THEN_FAILED, THEN_UNPLANNED = "start", "failed", "unplanned"
CHECKS = ("probe", "health", "watchdog")         # deadlines of their own, beside the state's


class Service:
    """One service: what is, what was asked, what is awaited.  Plain data only:
    the handoff carries CARRIED as it is; live handles (pidfd, pipes, sockets,
    probes, timers) are the supervisor's, beside it."""

    CARRIED = ("state", "pid", "started", "started_mono", "exitstatus", "reason", "ready",
               "failures", "restarts", "unplanned", "last_unplanned", "health_failures",
               "status_text", "mainpid", "stopping_notified", "dropped_bytes",
               "want", "then", "waiting_for",
               "deadline", "on_deadline", "probe_at", "health_at", "watchdog_at")
    __slots__ = ("program", "name") + CARRIED

    def __init__(self, program):
        self.program = program
        self.name = program.name
        # what is
        self.state = STOPPED
        self.pid = None
        self.started = None           # wall clock of the last spawn, for status
        self.started_mono = None
        self.exitstatus = None
        self.reason = "not started"   # for status: why the service is in its state
        self.ready = False
        self.failures = 0             # failed starts in a row; a start that succeeds resets it
        self.restarts = 0             # automatic restarts since the supervisor began
        self.unplanned = 0            # unplanned restarts since the last immediate one
        self.last_unplanned = None    # monotonic time of the last unplanned restart
        self.health_failures = 0      # failed healthchecks in a row
        self.status_text = None       # STATUS= from sd_notify
        self.mainpid = None           # MAINPID= from sd_notify
        self.stopping_notified = False    # STOPPING=1: the service said it would exit
        self.dropped_bytes = 0        # output its log (or our stdout) could not take
        # what was asked
        self.want = UP if program.autostart else DOWN
        self.then = None              # once a stopping process is gone: THEN_*, or None
        # what is awaited
        self.waiting_for = None       # required services not ready yet (in STOPPED)
        self.deadline = None          # the state's deadline (monotonic) ...
        self.on_deadline = None       # ... and what happens at it (a Deadline's `what`)
        self.probe_at = None          # next readiness probe (STARTING, ready = tcp/exec)
        self.health_at = None         # next healthcheck (RUNNING)
        self.watchdog_at = None       # WATCHDOG=1 is due by then (RUNNING)

    def alive(self):
        return self.pid is not None

    def uptime(self, now):
        return now - self.started_mono if self.started_mono is not None else 0.0

    def deadlines(self):
        """(what, when) of every deadline armed: the timers are rebuilt from this alone."""
        for what, when in ((self.on_deadline, self.deadline), ("probe", self.probe_at),
                           ("health", self.health_at), ("watchdog", self.watchdog_at)):
            if when is not None and what is not None:
                yield what, when


class Plain:
    """Base of events and effects: positional fields (None when left out),
    equal by value, readable."""
    __slots__ = ()

    def __eq__(self, other):
        return type(self) is type(other) and all(
            getattr(self, n) == getattr(other, n) for n in self.__slots__)

    __hash__ = None

    def __repr__(self):
        return "%s(%s)" % (type(self).__name__, ", ".join(repr(getattr(self, n)) for n in self.__slots__))


def _plain(name, fields, doc):
    names = tuple(fields.split())
    # a plain __init__ per class: one is made for every event and effect, and a
    # generic loop over the fields made each restart measurably slower
    code = "def __init__(self%s):\n    %s\n" % ("".join(", %s=None" % n for n in names),
                                                "; ".join("self.%s = %s" % (n, n) for n in names) or "pass")
    space = {}
    exec(code, space)
    return type(name, (Plain,), {"__slots__": names, "__doc__": doc, "__init__": space["__init__"]})


# Events: what happened to a service
Want = _plain("Want", "want fresh", "Asked: UP, DOWN, FORGET or 'restart'; fresh: an operator's try, even after FATAL.")
Stop = _plain("Stop", "reason", "Its turn in a stop wave: signal it if it runs.")
Spawned = _plain("Spawned", "pid wall", "The process started.")
SpawnFailed = _plain("SpawnFailed", "message", "The process could not be started.")
Exited = _plain("Exited", "status how", "The process exited (status as Popen.returncode, None if unknown).")
Deadline = _plain("Deadline", "what", "A deadline came: what the record paired it with.")
ProbeDone = _plain("ProbeDone", "kind ok why", "A readiness ('ready') or liveness ('health') probe ended.")
NotifyMessage = _plain("NotifyMessage", "fields", "An sd_notify message from the service, as {key: value}.")
ProgramChanged = _plain("ProgramChanged", "program restart", "A reload changed its section; restart: its process must.")
Shutdown = _plain("Shutdown", "", "The supervisor is stopping everything.")
ListenerBroke = _plain("ListenerBroke", "why", "An event listener broke supervisord's protocol.")

# Effects: what the supervisor must do for it
Spawn = _plain("Spawn", "", "Start the process; answer with Spawned or SpawnFailed.")
Signal = _plain("Signal", "pid sig group", "Send a signal to a process (group: its whole process group).")
Kill = _plain("Kill", "", "stopwaitsecs are over: SIGKILL, or find it gone (Exited).")
Arm = _plain("Arm", "what when", "(Re)arm the deadline slot of `what` for `when` (None: cancel); then Deadline(what).")
StartProbe = _plain("StartProbe", "kind", "Run one probe ('ready' or 'health'); answer with ProbeDone.")
CancelProbes = _plain("CancelProbes", "", "Probes in flight no longer count.")
Log = _plain("Log", "level message", "One line in the supervisor's log, about this service.")
StateChanged = _plain("StateChanged", "old new", "The state changed: every subscriber hears of it.")
Forget = _plain("Forget", "", "Removed from the config and stopped: drop it.")
ExitOnFatal = _plain("ExitOnFatal", "", "exit_on_fatal: a FATAL service stops everything, exit 1.")


class Context:
    """What step may know beyond the service itself."""

    def __init__(self, blockers=lambda svc: [], rand=uniform):
        self.shutting_down = False
        self.exit_on_fatal = False
        self.blockers = blockers      # svc -> names of required services not ready yet
        self.rand = rand              # [0, 1) for the backoff jitter


def slot_of(what):
    """The timer slot a deadline uses: each check its own, the rest the state's."""
    return what if what in CHECKS else "state"


def backoff_delay(program, n, rand=uniform):
    """Delay before the n-th retry: d = min(backoff_max, backoff * 2**(n-1)),
    drawn uniformly from [d/2, d]."""
    d = min(program.backoff_max, program.backoff * 2 ** min(n - 1, 64))
    return d / 2 + rand() * d / 2


def parse_notify(text):
    """An sd_notify datagram as {key: value}."""
    fields = {}
    for line in text.split("\n"):
        key, sep, value = line.partition("=")
        if sep:
            fields[key.strip()] = value
    return fields


def step(svc, event, now, ctx):
    """The policy: one event for one service at time `now`.  Updates the record
    and returns the effects, in order; never does I/O itself."""
    out = []
    TRANSITIONS[type(event)](svc, event, now, ctx, out)
    return out


# -- the small moves every transition is made of ----------------------------

def _enter(svc, state, reason, out):
    if reason is not None:
        svc.reason = reason
    if svc.state != state:
        old, svc.state = svc.state, state
        out.append(StateChanged(old, state))


def _arm(svc, what, when, out):
    """The state's own deadline (one at a time)."""
    if svc.deadline is None and when is None:
        return
    if when is None:
        what = svc.on_deadline            # the one cancelled
    svc.deadline, svc.on_deadline = when, (what if when is not None else None)
    out.append(Arm(what, when))


def _arm_check(svc, what, when, out):
    setattr(svc, what + "_at", when)
    out.append(Arm(what, when))


def _stop_checks(svc, out):
    for what in CHECKS:
        if getattr(svc, what + "_at") is not None:
            _arm_check(svc, what, None, out)
    out.append(CancelProbes())


def _try_start(svc, now, ctx, out, reason=""):
    """Start now, or wait (STOPPED) for what it requires to be ready."""
    if ctx.shutting_down or svc.alive():
        return
    _arm(svc, None, None, out)
    blockers = ctx.blockers(svc)
    if blockers:
        if svc.waiting_for != blockers:
            out.append(Log("info", "waiting for " + ", ".join(blockers)))
        svc.waiting_for = blockers
        _enter(svc, STOPPED, "waiting for " + ", ".join(blockers), out)
        return
    svc.waiting_for = None
    svc.reason = reason
    out.append(Spawn())


def _stop(svc, reason, now, out):
    """Signal a live process to stop; SIGKILL at stopwaitsecs."""
    if svc.state == STOPPING:
        return
    prog = svc.program
    _stop_checks(svc, out)
    out.append(Log("info", "stopping (%s, %s)" % (reason, signal_name(prog.stopsignal))))
    _enter(svc, STOPPING, reason, out)
    out.append(Signal(svc.pid, prog.stopsignal, prog.stopasgroup))
    if prog.stopsignal not in (signal.SIGKILL, signal.SIGCONT):
        out.append(Signal(svc.pid, signal.SIGCONT, prog.stopasgroup))    # a stopped process must wake to die
    _arm(svc, "stop_timeout", now + prog.stopwaitsecs, out)


def _became_ready(svc, now, out, how=None):
    prog = svc.program
    svc.ready = True
    _stop_checks(svc, out)
    _enter(svc, RUNNING, None, out)
    if how:
        out.append(Log("info", how))
    out.append(Log("info", "running (pid %d)" % svc.pid))
    _arm_liveness(svc, now, out)
    if svc.uptime(now) >= prog.startsecs:
        svc.failures = 0          # a start that succeeds resets the failed starts
        _arm(svc, None, None, out)
    else:                         # ready before startsecs: the start succeeds at startsecs
        _arm(svc, "started", svc.started_mono + prog.startsecs, out)


def _arm_liveness(svc, now, out):
    prog = svc.program
    if prog.healthcheck:
        _arm_check(svc, "health", now + prog.healthcheck_interval, out)
    if prog.watchdog and prog.ready[0] == "notify":
        _arm_check(svc, "watchdog", now + prog.watchdog, out)


def _failed_start(svc, how, now, ctx, out):
    prog = svc.program
    svc.failures += 1
    if prog.startretries is not None and svc.failures > prog.startretries:
        reason = "%s; gave up after %s" % (how, plural(svc.failures, "failed start"))
        out.append(Log("error", reason))
        _enter(svc, FATAL, reason, out)
        if ctx.exit_on_fatal:
            out.append(ExitOnFatal())
        return
    delay = backoff_delay(prog, svc.failures, ctx.rand)
    out.append(Log("warn", "%s: failed start %d, retrying in %.2fs" % (how, svc.failures, delay)))
    _enter(svc, BACKOFF, how, out)
    _arm(svc, "backoff_over", now + delay, out)


def _unplanned_restart(svc, cause, now, ctx, out):
    """SPEC's unplanned restarts: immediate after a stable run (no unplanned
    restart within backoff_reset), else a backoff in BACKOFF; never FATAL."""
    prog = svc.program
    if svc.last_unplanned is None or prog.backoff_reset <= 0 or now - svc.last_unplanned > prog.backoff_reset:
        svc.unplanned = 0
        svc.last_unplanned = now
        svc.restarts += 1
        out.append(Log("info", "%s; restarting" % cause))
        _try_start(svc, now, ctx, out, reason=cause)
        return
    svc.unplanned += 1
    delay = backoff_delay(prog, svc.unplanned, ctx.rand)
    # measured from the restart itself: a stable run is one that lasted backoff_reset
    svc.last_unplanned = now + delay
    out.append(Log("warn", "%s; unplanned restart %d within %gs, restarting in %.2fs"
                   % (cause, svc.unplanned, prog.backoff_reset, delay)))
    _enter(svc, BACKOFF, cause, out)
    _arm(svc, "backoff_over", now + delay, out)


def _restart_live(svc, cause, now, out):
    """A health or watchdog restart: stop it, then restart by the unplanned policy."""
    out.append(Log("warn", "restarting: %s" % cause))
    svc.then = THEN_UNPLANNED
    _stop(svc, cause, now, out)


# -- one function per event --------------------------------------------------

def _on_want(svc, ev, now, ctx, out):
    if ev.want == "restart":
        svc.want, svc.failures = UP, 0
        if svc.alive():
            svc.then = THEN_START     # stopped by its stop wave, then started
    elif ev.want == UP:
        svc.want = UP
        if ev.fresh and not svc.alive():
            svc.failures = 0          # an operator's start is a fresh try, even after FATAL
        if svc.state == STOPPING:
            svc.then = svc.then or THEN_START
        elif not svc.alive():
            _try_start(svc, now, ctx, out)        # also ends a BACKOFF wait
    elif ev.want == DOWN:
        if svc.want != FORGET:
            svc.want = DOWN
        svc.then = None
    elif ev.want == FORGET:
        svc.want, svc.then = FORGET, None
        if svc.alive():
            _stop(svc, "removed from the config", now, out)
        else:
            _arm(svc, None, None, out)
            out.append(Forget())


def _on_stop(svc, ev, now, ctx, out):
    if svc.alive():
        _stop(svc, ev.reason, now, out)
    elif svc.state in (BACKOFF, STARTING) or svc.waiting_for:
        _arm(svc, None, None, out)
        svc.waiting_for = None
        _enter(svc, STOPPED, ev.reason, out)


def _on_spawned(svc, ev, now, ctx, out):
    prog = svc.program
    svc.pid, svc.started, svc.started_mono = ev.pid, ev.wall, now
    svc.ready = svc.stopping_notified = False
    svc.status_text = svc.mainpid = None
    svc.health_failures = 0
    _enter(svc, STARTING, None, out)
    if prog.ready[0] == "none":
        if prog.startsecs <= 0:
            _became_ready(svc, now, out)
        else:
            _arm(svc, "startsecs", now + prog.startsecs, out)
        return
    _arm(svc, "ready_timeout", now + prog.ready_timeout, out)
    if prog.ready[0] in ("tcp", "exec"):
        _arm_check(svc, "probe", now + (0.05 if prog.ready[0] == "tcp" else 0.1), out)


def _on_spawn_failed(svc, ev, now, ctx, out):
    out.append(Log("error", ev.message))
    svc.exitstatus = None
    svc.started_mono = now
    _failed_start(svc, ev.message, now, ctx, out)


def _on_exited(svc, ev, now, ctx, out):
    prog = svc.program
    pid, svc.pid = svc.pid, None
    if pid is not None and prog.killasgroup:
        out.append(Signal(pid, signal.SIGKILL, True))    # no grandchild outlives its service
    _stop_checks(svc, out)
    _arm(svc, None, None, out)
    svc.ready = False
    svc.exitstatus = ev.status
    how = ev.how or describe_exit(ev.status)
    then, svc.then = svc.then, None
    if svc.state == STOPPING and then != THEN_FAILED:
        cause = svc.reason
        out.append(Log("info", "stopped (%s)" % describe_exit(ev.status)))
        _enter(svc, STOPPED, svc.reason or "stopped", out)
        if svc.want == FORGET:
            out.append(Forget())
        elif ctx.shutting_down or svc.want != UP:
            pass
        elif then == THEN_START:
            svc.restarts += 1
            _try_start(svc, now, ctx, out)
        elif then == THEN_UNPLANNED:
            _unplanned_restart(svc, cause, now, ctx, out)
        return
    if ctx.shutting_down or svc.want != UP:
        _enter(svc, EXITED, how, out)
        return
    if then == THEN_FAILED:       # killed at ready_timeout: its reason says why
        _failed_start(svc, svc.reason, now, ctx, out)
        return
    expected = ev.status in prog.exitcodes
    restart_wanted = prog.autorestart is True or (prog.autorestart == "unexpected" and not expected)
    # STOPPING=1 announced the exit: it ran as it should, whatever its uptime
    started_ok = svc.stopping_notified or (svc.state == RUNNING and svc.uptime(now) >= prog.startsecs)
    if started_ok:
        svc.failures = 0
        if restart_wanted:
            _unplanned_restart(svc, "%s after %s" % (how, fmt_duration(svc.uptime(now))), now, ctx, out)
            return
    elif restart_wanted or not expected:
        _failed_start(svc, how, now, ctx, out)
        return
    # done as asked: autorestart false, or a one-shot that exited as expected, however fast
    out.append(Log("info", "exited (%s)" % how))
    _enter(svc, EXITED, how, out)


def _on_deadline(svc, ev, now, ctx, out):
    what = ev.what
    if what in CHECKS:
        if getattr(svc, what + "_at") is None:
            return                # cancelled meanwhile
    elif what != svc.on_deadline:
        return
    else:
        svc.deadline = svc.on_deadline = None
    alive = svc.alive()
    prog = svc.program
    if what == "startsecs" and svc.state == STARTING and alive:
        _became_ready(svc, now, out)
    elif what == "started" and svc.state == RUNNING:
        svc.failures = 0
    elif what == "ready_timeout" and svc.state == STARTING and alive:
        why = "not ready within %gs" % prog.ready_timeout
        out.append(Log("warn", why))
        svc.then = THEN_FAILED
        _stop(svc, why, now, out)
    elif what == "backoff_over" and svc.state == BACKOFF:
        if svc.want == UP and not ctx.shutting_down:
            svc.restarts += 1
            _try_start(svc, now, ctx, out)
    elif what == "stop_timeout" and svc.state == STOPPING and alive:
        out.append(Kill())
    # a check's time stays in the record until it is re-armed: a re-exec while a
    # probe runs finds a time in the past, and probes again at once
    elif what == "probe" and svc.state == STARTING and alive:
        out.append(StartProbe("ready"))
    elif what == "health" and svc.state == RUNNING and alive:
        out.append(StartProbe("health"))
    elif what == "watchdog" and svc.state == RUNNING and alive:
        _restart_live(svc, "watchdog: no WATCHDOG=1 for %gs" % prog.watchdog, now, out)


def _on_probe_done(svc, ev, now, ctx, out):
    prog = svc.program
    if ev.kind == "ready":
        if svc.state == STARTING and svc.alive():
            if ev.ok:
                _became_ready(svc, now, out)
            else:
                _arm_check(svc, "probe", now + 0.1, out)
        return
    if svc.state != RUNNING or not svc.alive():
        return
    if ev.ok:
        svc.health_failures = 0
    else:
        svc.health_failures += 1
        out.append(Log("warn", "healthcheck failed (%d/%d): %s"
                       % (svc.health_failures, prog.healthcheck_failures, ev.why)))
        if svc.health_failures >= prog.healthcheck_failures:
            _restart_live(svc, "healthcheck failed %d times: %s" % (svc.health_failures, ev.why), now, out)
            return
    _arm_check(svc, "health", now + prog.healthcheck_interval, out)


def _on_notify(svc, ev, now, ctx, out):
    fields, prog = ev.fields, svc.program
    if "STATUS" in fields:
        svc.status_text = fields["STATUS"]
    if "MAINPID" in fields and fields["MAINPID"].isdigit():
        svc.mainpid = int(fields["MAINPID"])
    if fields.get("STOPPING") == "1":
        svc.stopping_notified = True
    if fields.get("READY") == "1" and svc.state == STARTING and svc.alive():
        _became_ready(svc, now, out, "READY=1")
    if fields.get("WATCHDOG") == "1" and svc.state == RUNNING and prog.watchdog:
        _arm_check(svc, "watchdog", now + prog.watchdog, out)
    if fields.get("WATCHDOG") == "trigger" and svc.state == RUNNING and svc.alive():
        _restart_live(svc, "watchdog triggered by the service", now, out)


def _on_program_changed(svc, ev, now, ctx, out):
    before, prog = svc.program, ev.program
    svc.program = prog
    if svc.want == FORGET:
        # removed by an earlier reload and still stopping, now back in the config:
        # started again once its old process is gone (if it starts by itself)
        svc.want = UP if prog.autostart else DOWN
        if svc.want == UP and svc.alive():
            svc.then = THEN_START
        return
    if ev.restart and svc.alive():
        svc.then = THEN_START
        _stop(svc, "config changed", now, out)
        return
    if svc.state == RUNNING and svc.alive() and (before.healthcheck, before.watchdog) != (
            prog.healthcheck, prog.watchdog):
        _stop_checks(svc, out)
        _arm_liveness(svc, now, out)
    if before.autostart != prog.autostart and not svc.alive() and svc.want != FORGET:
        svc.want = UP if prog.autostart else DOWN


def _on_shutdown(svc, ev, now, ctx, out):
    if svc.want != FORGET:
        svc.want = DOWN
    svc.then = None


def _on_listener_broke(svc, ev, now, ctx, out):
    # deaf from now on (supervisord leaves it so, UNKNOWN): restarted as a failed healthcheck is
    if svc.alive() and svc.state in (STARTING, RUNNING):
        _restart_live(svc, ev.why, now, out)


TRANSITIONS = {
    Want: _on_want, Stop: _on_stop, Spawned: _on_spawned, SpawnFailed: _on_spawn_failed,
    Exited: _on_exited, Deadline: _on_deadline, ProbeDone: _on_probe_done,
    NotifyMessage: _on_notify, ProgramChanged: _on_program_changed, Shutdown: _on_shutdown,
    ListenerBroke: _on_listener_broke,
}


def should_be_running(svc):
    """For `status` exit code 3: a wanted service that is not running as it should."""
    if svc.want != UP:
        return True
    if svc.state in (FATAL, BACKOFF, STOPPED):
        return False
    if svc.state == EXITED:
        return svc.exitstatus in svc.program.exitcodes and svc.program.autorestart is not True
    return True


def start_blockers(svc, services):
    """Names of required services that are not ready yet."""
    return [r for r in svc.program.requires
            if r in services and not (services[r].state == RUNNING and services[r].ready)]


def stop_waves(names, services):
    """Order a stop: each wave is a list of names signalled together.  The exact
    reverse of the start: a service that requires another starts once that one is
    ready, so it stands at the level of the highest priority it waits for (its own
    or, through requires, any other's); levels stop highest first, and within a
    level a service always stops before what it requires."""
    level = {}

    def level_of(name, seen=()):
        if name not in level:
            prog = services[name].program
            level[name] = max([prog.priority] + [level_of(r, seen + (name,)) for r in prog.requires
                                                 if r in services and r != name and r not in seen])
        return level[name]
    alive = set(names)
    waves = []
    while alive:
        required = {r for o in alive for r in services[o].program.requires if r != o}
        free = [n for n in alive if n not in required]
        if not free:              # cannot happen with a validated config; do not hang
            free = list(alive)
        top = max(level_of(n) for n in free)
        wave = sorted(n for n in free if level_of(n) == top)
        waves.append(wave)
        alive.difference_update(wave)
    return waves


def record_from_format1(entry, prog, now):
    """A service entry of a format-1 handoff (respawn 1.0.0) as record fields:
    what 1.0.0 kept in flags and timer callbacks, made explicit."""
    keep = ("state", "pid", "started", "started_mono", "exitstatus", "reason", "ready", "failures",
            "restarts", "health_failures", "status_text", "mainpid", "stopping_notified")
    out = {k: entry[k] for k in keep if k in entry}
    state, alive, when = entry.get("state", STOPPED), entry.get("pid") is not None, entry.get("deadline")
    out["want"] = FORGET if entry.get("removed") else (UP if entry.get("wanted", prog.autostart) else DOWN)
    then = entry.get("stop_then_start", False)
    out["then"] = (THEN_FAILED if entry.get("failing") else THEN_UNPLANNED if isinstance(then, str) and then
                   else THEN_START if then else None)
    if entry.get("failing"):
        out["reason"] = entry["failing"]
    if state == BACKOFF and when is not None:
        out["deadline"], out["on_deadline"] = when, "backoff_over"
    elif state == STOPPING and when is not None and alive:
        out["deadline"], out["on_deadline"] = when, "stop_timeout"
    elif state == STARTING and alive:
        out["on_deadline"] = "startsecs" if prog.ready[0] == "none" else "ready_timeout"
        out["deadline"] = when if when is not None else now
        if prog.ready[0] in ("tcp", "exec"):
            out["probe_at"] = now
    elif state == RUNNING and alive:
        if prog.healthcheck:
            out["health_at"] = entry.get("health_at") or now
        if prog.watchdog and prog.ready[0] == "notify" and entry.get("watchdog_at") is not None:
            out["watchdog_at"] = entry["watchdog_at"]
    reason = entry.get("reason") or ""
    if state == STOPPED and reason.startswith("waiting for "):
        out["waiting_for"] = reason[len("waiting for "):].split(", ")
    return out


# ---------------------------------------------------------------------------
# Processes: spawn, signal, watch
# ---------------------------------------------------------------------------

class SpawnError(Exception):
    """A service could not be started: missing command, directory, user..."""


def _child_setup(umask, ids, nofile):
    """preexec_fn for what Popen cannot do itself: user, group and umask on 3.8,
    the services' own soft RLIMIT_NOFILE everywhere."""
    def setup():
        if nofile is not None:
            import resource
            resource.setrlimit(resource.RLIMIT_NOFILE, nofile)
        if umask is not None:
            os.umask(umask)
        if ids:
            uid, gid, groups = ids
            os.setgroups(groups)
            os.setgid(gid)
            os.setuid(uid)
    return setup


# The soft RLIMIT_NOFILE our services get: the one we were started with, when
# raise_nofile() raised ours (None: ours is theirs).  A re-exec carries it over.
SERVICE_NOFILE = None
# fds held open below that limit, so that Popen finds free low numbers for the
# /dev/null and the error pipe it opens before the fork while our soft limit is
# lowered to the services' (a new fd takes the lowest free number)
_SPARE_FDS = []
SPARE_FDS = 4


def set_service_nofile(soft):
    global SERVICE_NOFILE
    SERVICE_NOFILE = soft
    while _SPARE_FDS:
        os.close(_SPARE_FDS.pop())
    if soft is not None:
        _reserve_spare_fds()


def _reserve_spare_fds():
    try:
        while len(_SPARE_FDS) < SPARE_FDS:
            _SPARE_FDS.append(os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC))
    except OSError:
        pass          # fewer spares: spawn() sets the limit in the child instead


def spawn(prog, stdout, stderr, extra_env=None, hold=(), stdin=None):
    """Start a program's process in its own session and process group; its pid.

    stdout/stderr are fds (or subprocess.DEVNULL, subprocess.STDOUT).  The child
    starts clean: the supervisor keeps its own mask empty and no signal ignored
    but the two Python ignores itself, which restore_signals puts back (research
    F25).  No preexec_fn where it can be helped: without one Popen uses vfork
    (3.10+), about twice as fast as a fork running Python in the child.  So the
    services' soft RLIMIT_NOFILE is set in our own process around the call (we
    are single-threaded) and inherited.  os.posix_spawn was measured too: no
    faster than Popen's vfork, and glibc's leaves its two internal signals (32,
    33) ignored in the child, which SPEC's clean child rules out.
    hold: fds the child keeps at the same numbers (its pipes' read ends)."""
    import subprocess
    # What the child's environment has beyond ours is set in ours around the
    # call, as the rlimit is, and the child inherits it (env=None): every service
    # gets its marker, and a dict of our whole environment cost two Python calls
    # per variable to copy and two to encode again in Popen, ~60 us of a restart
    # with 40 variables.  glibc's setenv keeps one copy of each distinct
    # NAME=value it was given: a config's services set a fixed few, not one per spawn.
    env = dict(prog.environment)
    ids = None
    try:
        who = resolve_user(prog)
    except KeyError:
        raise SpawnError("unknown user or group %r" % (prog.user or prog.group)) from None
    if who:
        uid, gid, groups, home, name = who
        if name:
            # supervisord leaves the supervisor's HOME and USER: a classic surprise
            env.update(HOME=home, USER=name, LOGNAME=name)
        if os.geteuid() == 0:
            ids = (uid, gid, groups)
        elif uid != os.geteuid():
            raise SpawnError("user %r needs the supervisor to run as root" % prog.user)
    if extra_env:
        env.update(extra_env)
    kwargs = dict(stdin=subprocess.DEVNULL if stdin is None else stdin, stdout=stdout, stderr=stderr,
                  cwd=prog.directory, start_new_session=True, close_fds=True, restore_signals=True)
    if hold:
        kwargs["pass_fds"] = tuple(hold)
    umask = prog.umask
    if sys.version_info >= (3, 9):
        if ids:
            kwargs.update(user=ids[0], group=ids[1], extra_groups=ids[2])
        ids = umask = None
        if prog.umask is not None:
            kwargs["umask"] = prog.umask
    ours = lowered = nofile = None
    if SERVICE_NOFILE is not None:
        import resource
        ours = resource.getrlimit(resource.RLIMIT_NOFILE)
        if len(_SPARE_FDS) == SPARE_FDS and max(_SPARE_FDS) < SERVICE_NOFILE:
            lowered = (SERVICE_NOFILE, ours[1])
        else:
            nofile = (SERVICE_NOFILE, ours[1])
    if ids or umask is not None or nofile:
        kwargs["preexec_fn"] = _child_setup(umask, ids, nofile)
    saved = [(key, os.environ.get(key)) for key in env]
    try:
        if lowered:
            while _SPARE_FDS:
                os.close(_SPARE_FDS.pop())
            resource.setrlimit(resource.RLIMIT_NOFILE, lowered)
        try:
            # os.putenv leaves os.environ as it is: it stays what we have once restored
            for key, value in env.items():
                os.putenv(key, value)
            proc = subprocess.Popen(list(prog.command), **kwargs)
        finally:
            for key, value in saved:
                if value is None:
                    os.unsetenv(key)
                else:
                    os.putenv(key, value)
            if lowered:
                resource.setrlimit(resource.RLIMIT_NOFILE, ours)
                _reserve_spare_fds()
    except FileNotFoundError as exc:
        if prog.directory and not os.path.isdir(prog.directory):
            raise SpawnError("directory %r does not exist" % prog.directory) from None
        raise SpawnError("command %r not found" % (exc.filename or prog.command[0])) from None
    except PermissionError as exc:
        raise SpawnError("cannot execute %r: %s" % (prog.command[0], exc.strerror)) from None
    except (OSError, subprocess.SubprocessError, ValueError) as exc:
        raise SpawnError("cannot start %r: %s" % (prog.command[0], exc)) from None
    # We reap through pidfd/waitpid ourselves.  A Popen left with returncode
    # None would go to subprocess._active when dropped and be reaped by the next
    # Popen, stealing the exit status (research F21), so mark it as done.
    proc.returncode = 0
    return proc.pid


def descriptors_needed(config):
    """About how many fds supervising a config takes: per service its pidfd,
    the read end of each piped stream, a log file per stream, the notify
    socket; and a margin for our own (socket, clients, probes, the handoff)."""
    need = 64
    for prog in config.programs.values():
        need += 1 + (prog.ready[0] == "notify")
        for stream in ("stdout", "stderr"):
            target = prog.stream_target(stream)
            if target not in ("none", "merged"):
                need += 1 if target == "prefix" else 2
    return need


def raise_nofile(config):
    """Raise our soft RLIMIT_NOFILE to the hard limit (systemd's rule for its
    own), keeping the soft limit we were given for the services; a warning
    when even the hard limit is too small for the config, or None."""
    import resource
    try:
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        # no soft limit can pass the kernel's fs.nr_open (1 MiB by default)
        top = hard if hard != resource.RLIM_INFINITY else 1 << 20
        if soft != resource.RLIM_INFINITY and soft < top:
            resource.setrlimit(resource.RLIMIT_NOFILE, (top, hard))
            set_service_nofile(soft)
    except (OSError, ValueError) as exc:
        return "cannot raise RLIMIT_NOFILE: %s" % exc
    need = descriptors_needed(config)
    if hard != resource.RLIM_INFINITY and need > hard:
        return ("%d services need about %d file descriptors, more than the hard "
                "RLIMIT_NOFILE of %d: some will fail to start (raise it: ulimit -Hn, "
                "LimitNOFILE= in a systemd unit)" % (len(config.programs), need, hard))
    return None


def kill_group_or_pid(pid, sig, group):
    """Signal a service's process group (pgid == pid: it leads a new session) or pid."""
    try:
        if group:
            os.killpg(pid, sig)
        else:
            os.kill(pid, sig)
        return True
    except ProcessLookupError:
        return False
    except PermissionError:
        if group:                 # a member changed uid: still reach the leader
            try:
                os.kill(pid, sig)
                return True
            except OSError:
                return False
        return False


class ChildWatcher:
    """Tells the loop when a child of ours exited, with its status; one reaper only.

    PidfdWatcher and SigchldWatcher implement it; one is chosen at start-up and
    the loop never asks which.  In reaper mode (PID 1 or subreaper) orphans are
    reaped too, without ever taking a watched child's status (research F21)."""

    needs_sigchld = False         # the loop must turn SIGCHLD into sigchld() calls
    uses_pidfds = False
    description = ""

    def __init__(self, selector, reap_orphans):
        self.selector = selector
        self.reap_orphans = reap_orphans
        self.callbacks = {}       # pid -> callback(pid, exitstatus)
        self.abandoned = set()    # reaped quietly: nobody waits for them

    def watch(self, pid, callback):
        raise NotImplementedError

    def adopt(self, pid, callback):
        """After a re-exec: watch a child the previous image started.  False if it
        is not our child any more (nothing to watch)."""
        try:
            os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
        except ChildProcessError:
            return False
        self.watch(pid, callback)
        return True

    def inherit(self, pidfds):
        """After a re-exec: the pidfds the previous image handed over, (pid, fd)
        pairs, which watch() takes instead of opening new ones.  This watcher has
        no use for them: closed."""
        for _, fd in pidfds or ():
            os.close(fd)

    def close_inherited(self):
        pass

    def abandon(self, pid):
        """Nobody waits for this child any more: reap it quietly when it exits."""
        self.abandoned.add(pid)
        if pid in self.callbacks:
            self.callbacks[pid] = self._reaped_quietly
        else:
            self.watch(pid, self._reaped_quietly)

    def _reaped_quietly(self, pid, status):
        self.abandoned.discard(pid)

    def sigchld(self):
        """SIGCHLD arrived (reaper mode and fallback): collect what exited."""
        raise NotImplementedError

    def sweep(self):
        """After a re-exec: collect children that exited during the exec window."""
        self.sigchld()

    def close(self):
        pass

    def _dispatch(self, pid, status):
        callback = self.callbacks.pop(pid, None)
        if callback:
            callback(pid, status)

    def _reap_others(self):
        """waitpid on every zombie not watched by a pidfd: orphans in reaper mode."""
        while True:
            try:
                pid, wstatus = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            self._dispatch(pid, exit_code_of(wstatus))


class SigchldWatcher(ChildWatcher):
    """The fallback: SIGCHLD wakes the loop, one waitpid(-1) loop reaps and
    dispatches by pid.  Safe because this process has no other reaper."""

    needs_sigchld = True
    description = "SIGCHLD + waitpid"

    def watch(self, pid, callback):
        self.callbacks[pid] = callback

    def sigchld(self):
        self._reap_others()


class _PidfdReady:
    """A pidfd's selector callback: a quarter of a lambda's size, per child."""

    __slots__ = ("watcher", "pid")

    def __init__(self, watcher, pid):
        self.watcher, self.pid = watcher, pid

    def __call__(self, mask):
        self.watcher._ready(self.pid)


class PidfdWatcher(ChildWatcher):
    """Each child's pidfd sits in the selector: its exit wakes the loop at once."""

    uses_pidfds = True
    description = "pidfds"

    def __init__(self, selector, reap_orphans):
        super().__init__(selector, reap_orphans)
        self.pidfds = {}          # pid -> fd
        self.unwatched = set()    # children without a pidfd (EMFILE): collected at SIGCHLD
        self.needs_sigchld = True
        self.inherited = {}       # pid -> pidfd handed over by the previous image

    def inherit(self, pidfds):
        # a pidfd is the process itself, never a reused pid: no pidfd_open (5000
        # syscalls at 5000 services) and no check that it is still our child
        self.inherited = {pid: fd for pid, fd in pidfds or ()}

    def close_inherited(self):
        for fd in self.inherited.values():
            os.close(fd)
        self.inherited = {}

    def adopt(self, pid, callback):
        if pid in self.inherited:
            self.watch(pid, callback)
            return True
        return super().adopt(pid, callback)

    def watch(self, pid, callback):
        fd = self.inherited.pop(pid, None)
        try:
            if fd is None:
                fd = os.pidfd_open(pid)
        except ProcessLookupError:
            # already reaped (cannot happen for our own child): report a lost status
            callback(pid, None)
            return
        except OSError:
            # out of descriptors: the child is ours all the same, and its SIGCHLD says
            # when to look (a missed exit would leave the service unwatched for ever)
            self.callbacks[pid] = callback
            self.unwatched.add(pid)
            return
        self.callbacks[pid] = callback
        self.pidfds[pid] = fd
        self.selector.register(fd, selectors.EVENT_READ, _PidfdReady(self, pid))

    def _ready(self, pid):
        fd = self.pidfds.get(pid)
        if fd is None:
            return
        try:
            info = os.waitid(os.P_PIDFD, fd, os.WEXITED | os.WNOHANG)
        except ChildProcessError:
            info = None
            status = None         # someone else reaped it: nothing to report but the exit
        else:
            if info is None:
                return            # spurious wakeup: still running
            status = info.si_status if info.si_code == os.CLD_EXITED else -info.si_status
        self._forget(pid)
        self._dispatch(pid, status)

    def _forget(self, pid):
        fd = self.pidfds.pop(pid, None)
        if fd is not None:
            self.selector.unregister(fd)
            os.close(fd)

    def sigchld(self):
        self._collect_unwatched()
        if not self.reap_orphans:
            return
        # Peek without reaping: a watched child is consumed through its own
        # pidfd, anything else is an orphan re-parented to us (research E16).
        while True:
            try:
                info = os.waitid(os.P_ALL, 0, os.WEXITED | os.WNOHANG | os.WNOWAIT)
            except ChildProcessError:
                return
            if info is None:
                return
            if info.si_pid in self.pidfds:
                self._ready(info.si_pid)
            elif info.si_pid in self.unwatched:
                self._collect_unwatched()
            else:
                try:
                    os.waitpid(info.si_pid, os.WNOHANG)
                except ChildProcessError:
                    pass
                self._dispatch(info.si_pid, None)

    def _collect_unwatched(self):
        for pid in list(self.unwatched):
            try:
                info = os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG)
            except ChildProcessError:
                info = status = None
            else:
                if info is None:
                    continue
                status = info.si_status if info.si_code == os.CLD_EXITED else -info.si_status
            self.unwatched.discard(pid)
            self._dispatch(pid, status)

    def sweep(self):
        # a child that exited during the exec window: its pidfd, in the selector,
        # is readable at the loop's first turn (no waitid per child here)
        self.sigchld()

    def close(self):
        for pid in list(self.pidfds):
            self._forget(pid)


def pidfds_work():
    """pidfd_open exists (Python 3.9+) and the kernel has it (5.3+)."""
    if not hasattr(os, "pidfd_open") or not hasattr(os, "P_PIDFD"):
        return False
    try:
        os.close(os.pidfd_open(os.getpid()))
        return True
    except OSError:
        return False


def make_watcher(selector, reap_orphans):
    if os.environ.get("RESPAWN_NO_PIDFD") != "1" and pidfds_work():
        return PidfdWatcher(selector, reap_orphans)
    return SigchldWatcher(selector, reap_orphans)


def set_subreaper():
    """prctl(PR_SET_CHILD_SUBREAPER): orphans of our services come to us.  Linux only."""
    try:
        import ctypes
        import ctypes.util
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        return libc.prctl(36, 1, 0, 0, 0) == 0
    except (OSError, ImportError, AttributeError):
        return False


# ---------------------------------------------------------------------------
# Output: service pipes, line prefixing, log files
# ---------------------------------------------------------------------------

QUEUE_MAX = 1 << 20               # output kept for a slow pipe or terminal, then dropped


class Writer:
    """One fd the supervisor writes output to: its stdout or stderr, its own log,
    a service's log file.  A write never blocks and never raises: a full disk,
    /dev/full, a pipe nobody reads or a reader gone only makes it drop output,
    and count it.  With a selector, what a pipe or terminal cannot take at once
    waits (QUEUE_MAX at most) and goes out when the fd is writable: a reader
    that keeps up loses nothing.  Lines stay whole: a line whose head was
    written keeps its tail (written first when the fd takes data again), and a
    line whose head was dropped is dropped to its end.  `report(level, message)`
    hears once when an episode begins and once when it ends: with timers, a
    second after its last drop if a write went through since; without, at the
    first write that goes through a second after it."""

    def __init__(self, fd, name, report=None, selector=None, timers=None):
        self.fd, self.name, self.report, self.selector = fd, name, report, selector
        self.timers = timers
        self.ending = None            # the timer that ends the episode (see went_through)
        self.armed = False            # in the selector, waiting to write pending
        self.own = None               # a non-blocking fd of our own onto the same pipe or tty
        self.pending = b""            # what must go out first: a line's tail, or the queue
        self.open_line = False        # the fd's output ends inside a line
        self.skip = False             # dropping through the end of a line begun here
        self.failing = None           # why the current episode drops output
        self.episode = 0              # bytes dropped in the current episode
        self.dropped = 0              # bytes dropped in all
        self.written = 0
        self.last_drop = None
        self.may_block = False
        self.regular = False          # a regular file: a short write can be taken back
        try:
            mode = os.fstat(fd).st_mode
        except OSError:
            return                    # a closed fd: every write fails, and is counted
        self.regular = stat.S_ISREG(mode)
        # a regular file or /dev/null never makes a writer wait; a pipe, a socket or
        # a terminal can, forever.  O_NONBLOCK on the fd itself would change it for
        # everyone sharing it (the shell's terminal): open our own description of it.
        if not stat.S_ISREG(mode) and not (stat.S_ISCHR(mode) and not os.isatty(fd)):
            try:
                self.own = os.open("/proc/self/fd/%d" % fd,
                                   os.O_WRONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC)
                self.fd = self.own
            except OSError:
                self.may_block = True  # a socket: ask poll() first, write a page at a time

    def close(self):
        self._disarm()
        Timers.cancel(self.ending)
        self.ending = None
        if self.own is not None:
            os.close(self.own)
            self.own = None

    def write(self, data):
        """Write what can be written, in whole lines; the number of bytes dropped."""
        dropped = 0
        if self.skip:
            cut = data.find(b"\n") + 1
            if not cut:
                return self._drop(len(data))
            dropped, data, self.skip = self._drop(cut), data[cut:], False
        if self.pending:
            if self.armed:            # waiting for the fd: after what waits already
                return dropped + self._queue(data)
            data, self.pending = self.pending + data, b""
        if not data:
            return dropped
        try:
            n = self._write(data)
            error = None
        except OSError as exc:
            n, error = 0, exc.strerror or str(exc)
        if 0 < n < len(data) and self.regular:
            n = self._take_back(data, n)
        if n:
            self.written += n
            self.open_line = data[n - 1] != 0x0A
        if n == len(data):
            if self.failing:
                self.went_through()
            return dropped
        rest = data[n:]
        if self.selector is not None and not self.regular and error is None:
            return dropped + self._queue(rest)      # a pipe or terminal, full for now
        if self.open_line:
            # finish the line begun in the file before anything else goes there
            end = rest.find(b"\n") + 1 or len(rest)
            if end > MAX_PARTIAL:
                end = MAX_PARTIAL
                self.pending, rest = rest[:end] + b"\n", rest[end:]
                dropped += self._drop(len(rest))
                self.skip = True
            else:
                self.pending, rest = rest[:end], rest[end:]
        if rest:
            dropped += self._drop(len(rest))
            self.skip = not rest.endswith(b"\n")
        self.fail(error or (os.strerror(errno.ENOSPC) if self.regular
                            else "full: its reader does not keep up"))
        return dropped

    def _queue(self, data):
        """Keep data until the fd is writable: whole lines, QUEUE_MAX at most."""
        room = QUEUE_MAX - len(self.pending)
        if len(data) <= room:
            self.pending += data
            self._arm()
            return 0
        cut = data.rfind(b"\n", 0, max(0, room)) + 1
        ends_open = self.pending[-1:] != b"\n" if self.pending else self.open_line
        tail = b""
        if ends_open and not cut:     # the line begun is finished first, or cut as a pipe cuts it
            end = data.find(b"\n") + 1
            if 0 < end <= MAX_PARTIAL:
                cut = end
            else:
                cut, tail = min(len(data), MAX_PARTIAL), b"\n"
        self.pending += data[:cut] + tail
        self._arm()
        rest = data[cut:]
        if not rest:
            return 0
        self.skip = not rest.endswith(b"\n")
        self.fail("full: its reader does not keep up")
        return self._drop(len(rest))

    def flush(self, mask=None):
        """The fd is writable (a selector callback): write what waits."""
        try:
            n, error = self._write(self.pending), None
        except OSError as exc:
            n, error = 0, exc.strerror or str(exc)
        if n:
            self.written += n
            self.open_line = self.pending[n - 1] != 0x0A
            self.pending = self.pending[n:]
        if error and self.pending:    # the reader is gone: what waited is lost
            self.skip = self.pending[-1:] != b"\n"
            self._drop(len(self.pending))
            self.pending = b""
            self.fail(error)
        if not self.pending:
            self._disarm()
            if self.failing:
                self.went_through()

    def drain(self, timeout):
        """At exit: what waits goes out if the fd takes it within timeout seconds."""
        deadline = monotonic() + timeout
        while self.pending and self.fd >= 0:
            left = deadline - monotonic()
            if left <= 0:
                break
            try:
                if not selectors.select.select([], [self.fd], [], left)[1]:
                    break
            except (OSError, ValueError):
                break
            self.flush()

    def carry(self):
        """What a re-exec hands over of this writer (None: nothing to say): the
        bytes that wait for a slow reader, in order, and where its output stands
        (a line begun, a line being dropped, an episode of drops going on)."""
        if not (self.pending or self.open_line or self.skip or self.failing):
            return None
        import base64
        return {"pending": base64.b64encode(self.pending).decode(), "open_line": self.open_line,
                "skip": self.skip, "failing": self.failing, "episode": self.episode,
                "last_drop": self.last_drop}

    def take(self, carried):
        """The new image's writer takes over what the old one carried: what
        waited goes out first, before anything this image writes."""
        import base64
        self.pending = base64.b64decode(carried.get("pending") or "") + self.pending
        self.open_line = bool(carried.get("open_line")) or self.open_line
        self.skip = bool(carried.get("skip")) or self.skip
        if carried.get("failing") and not self.failing:
            self.failing, self.episode = carried["failing"], carried.get("episode") or 0
            self.last_drop = carried.get("last_drop") or monotonic()
        if self.pending and not self.regular:
            self._arm()

    def _arm(self):
        if self.selector is not None and not self.armed:
            self.selector.register(self.fd, selectors.EVENT_WRITE, self.flush)
            self.armed = True

    def _disarm(self):
        if self.armed:
            self.selector.unregister(self.fd)
            self.armed = False

    def drop(self, data):
        """Drop data unwritten (the file cannot be opened); the number of bytes."""
        if data:
            self.skip = not data.endswith(b"\n")
        self.fail("cannot write")
        return self._drop(len(data))

    def fail(self, why):
        """An episode begins, unless one is going on."""
        if not self.failing:
            self.failing, self.last_drop = why, monotonic()
            if self.report:
                self.report("warn", "cannot write to %s (%s): dropping output until it can"
                            % (self.name, why))

    def _write(self, data):
        if not self.may_block:
            try:
                return os.write(self.fd, data)
            except (BlockingIOError, InterruptedError):
                return 0
        done = 0
        while done < len(data):
            if not selectors.select.select([], [self.fd], [], 0)[1]:
                break
            try:
                done += os.write(self.fd, data[done:done + 4096])   # a page fits once poll said so
            except OSError:
                if not done:
                    raise
                break
        return done

    def _take_back(self, data, n):
        """A file filled up in the middle of a line: cut the head of that line off
        again (the file ends where our write did), so the file holds only whole lines."""
        whole = data.rfind(b"\n", 0, n) + 1
        if whole < n:
            try:
                os.ftruncate(self.fd, os.fstat(self.fd).st_size - (n - whole))
                return whole
            except OSError:
                pass
        return n

    def went_through(self):
        """All there was went out during an episode.  The episode ends after a
        second without a drop: a reader that keeps falling behind is one episode,
        not two lines of ours every few ms.  It ends then, by a timer, not at the
        next write after that second: our own log, written again within the
        second of its last drop and quiet afterwards, would otherwise say what
        it missed only at its next line, maybe hours later and far from the gap."""
        due = self.last_drop + 1.0
        if monotonic() >= due:
            self._recovered()
        elif self.timers is not None and self.ending is None:
            self.ending = self.timers.at(due, self._quiet_second)

    def go_on_from(self, old):
        """Take over the episode of the Writer this one replaces on the same file."""
        self.failing, self.episode, self.last_drop = old.failing, old.episode, old.last_drop
        if old.ending is not None and self.timers is not None:    # a line went in since
            self.ending = self.timers.at(old.last_drop + 1.0, self._quiet_second)

    def _quiet_second(self):
        # armed after a write went through; a drop since would have cancelled it
        self.ending = None
        if self.failing and not self.pending:
            self._recovered()

    def _drop(self, n):
        if self.ending is not None:
            Timers.cancel(self.ending)    # not a quiet second: the next write that goes through re-arms it
            self.ending = None
        self.last_drop = monotonic()
        self.episode += n
        self.dropped += n
        return n

    def _recovered(self):
        Timers.cancel(self.ending)
        self.ending = None
        lost, self.episode, self.failing = self.episode, 0, None
        if self.report:
            self.report("info", "writing to %s again; %d bytes were dropped" % (self.name, lost))


class LogFile:
    """A service log file, appended as the service wrote it, rotated by size
    at a line boundary, reopened on SIGUSR1 (logrotate).  Written through a
    Writer: on a full disk output is dropped in whole lines and counted, and
    a file that cannot be (re)opened is tried again at the next write."""

    REOPEN_EVERY = 1.0                # seconds between tries to open a file that failed

    def __init__(self, path, maxbytes, backups, report=None, timers=None):
        self.path, self.maxbytes, self.backups = path, maxbytes, backups
        self.fd = None
        self.size = 0
        self.out = Writer(-1, path, report, timers=timers)
        self.open_failed = None       # monotonic time of the last failed open
        self.open()

    @property
    def dropped(self):
        return self.out.dropped

    def open(self):
        dirname = os.path.dirname(self.path)
        if dirname:
            os.makedirs(dirname, exist_ok=True)
        # O_NONBLOCK: a FIFO named as a log file must not stop the loop (no reader: ENXIO)
        self.fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC
                          | os.O_NONBLOCK, 0o644)
        st = os.fstat(self.fd)
        self.size = st.st_size
        self.out.fd, self.out.regular = self.fd, stat.S_ISREG(st.st_mode)
        self.at_line_start = not self.out.pending
        self.open_failed = None

    def reopen(self):
        self.close()
        self.try_open()

    def try_open(self):
        try:
            self.open()
        except OSError as exc:
            self.open_failed = monotonic()
            self.out.fd = -1
            self.out.fail("cannot open it: %s" % (exc.strerror or exc))
            return False
        return True

    def close(self):
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None

    def write(self, data):
        """Write data; the number of bytes dropped (a full disk, a file that cannot be opened)."""
        if self.fd is None:
            if self.open_failed is not None and monotonic() - self.open_failed < self.REOPEN_EVERY \
                    or not self.try_open():
                return self.out.drop(data)
        dropped = 0
        if self.at_line_start is None:
            # after a splice, whose bytes we never saw: the file's last byte says
            self.at_line_start = self.ends_a_line()
            self.out.open_line = not self.at_line_start
        # One read can hold megabytes: cut it into whole lines that fit, and
        # rotate only between lines, so that no line is split across two files
        # and only a single line longer than maxbytes makes a file bigger.
        while data:
            if not self.maxbytes or self.size + len(data) <= self.maxbytes:
                return dropped + self._write(data)
            cut = data.rfind(b"\n", 0, max(0, self.maxbytes - self.size)) + 1
            if not cut:
                if self.size and self.at_line_start:
                    if not self.rotate():
                        return dropped + self.out.drop(data)
                    continue
                cut = data.find(b"\n") + 1 or len(data)   # end the line begun in this file
            dropped += self._write(data[:cut])
            data = data[cut:]
        return dropped

    def _write(self, data):
        before = self.out.written
        dropped = self.out.write(data)
        self.size += self.out.written - before
        self.at_line_start = not self.out.open_line
        return dropped

    def can_splice(self):
        """Open, a regular file, and its Writer with nothing held back (a line's
        tail to finish, a line being dropped, a failing disk): bytes moved by
        splice cannot be dropped in whole lines or counted, the Writer's can."""
        out = self.out
        return (self.fd is not None and out.regular and not out.pending and not out.skip
                and out.failing is None)

    def disk_has_room(self):
        """Whether the file system has a few MiB free: near a full disk the
        Writer's path (write, and take a torn line back) goes on instead, since
        a splice cut short by ENOSPC would leave half a line in the file."""
        try:
            st = os.fstatvfs(self.fd)
        except OSError:
            return False
        return st.f_bavail * st.f_frsize >= 4 * READ_SIZE

    def room(self):
        """Bytes that may go in before a rotation is due (READ_SIZE when unbounded)."""
        return READ_SIZE if not self.maxbytes else self.maxbytes - self.size

    def splice_from(self, fd, count):
        """Move up to count bytes from a pipe into the file inside the kernel
        (os.splice, 3.10+), never through our memory; the number moved, 0 at the
        pipe's end.  BlockingIOError when the pipe is empty, another OSError
        when splice cannot serve this file (the caller reads instead)."""
        flags = fcntl.fcntl(self.fd, fcntl.F_GETFL)
        # splice refuses an O_APPEND file: append by hand, from the end as it is
        # now (a logrotate copytruncate, another writer of the same file)
        fcntl.fcntl(self.fd, fcntl.F_SETFL, flags & ~os.O_APPEND)
        try:
            self.size = os.lseek(self.fd, 0, os.SEEK_END)
            n = os.splice(fd, self.fd, count, flags=SPLICE_FLAGS)
        finally:
            fcntl.fcntl(self.fd, fcntl.F_SETFL, flags)
        if n:
            self.size += n
            self.at_line_start = None         # not seen: looked up if a rotation needs it
        return n

    def ends_a_line(self):
        """Whether the file ends with a newline (after a splice): its last byte,
        read through /proc (our fd is write-only), which follows a rename."""
        try:
            fd = os.open("/proc/self/fd/%d" % self.fd, os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            return True
        try:
            return self.size == 0 or os.pread(fd, 1, self.size - 1) in (b"\n", b"")
        except OSError:
            return True
        finally:
            os.close(fd)

    def rotate(self):
        self.close()
        try:
            for n in range(self.backups - 1, 0, -1):
                older = "%s.%d" % (self.path, n)
                if os.path.exists(older):
                    os.replace(older, "%s.%d" % (self.path, n + 1))
            if self.backups > 0:
                os.replace(self.path, self.path + ".1")
            else:
                os.unlink(self.path)
        except FileNotFoundError:
            pass      # renamed away (logrotate before its SIGUSR1): start a new file anyway
        except OSError:
            pass      # a folder we may no longer write: the open below says so, once
        return self.try_open()


class Pipe:
    """The read end of one service stream, and the partial line read so far."""

    __slots__ = ("fd", "service", "stream", "partial", "carried", "held_pid", "held_fd", "ino", "splice",
                 "reader")

    def __init__(self, fd, service, stream, partial=b"", held=None):
        self.fd, self.service, self.stream, self.partial = fd, service, stream, partial
        self.carried = 0              # bytes read; -2 once grown, -1 if it could not be
        # held (pid, fd): the process holding a copy of it, at that fd; kept as two
        # slots, not the tuple (56 bytes a pipe, 0.5 MiB at 5000 services)
        self.held_pid, self.held_fd = held or (None, None)
        self.ino = None
        self.splice = SPLICE          # may go by splice to a log file (see splice_pipe)
        self.reader = None            # reader(pipe) when it is readable (Supervisor.add_pipe)

    def __call__(self, mask):
        # the pipe is its own selector callback: a lambda per pipe was ~240 bytes,
        # 2.3 MiB of a supervisor of 5000 services
        self.reader(self)


GROWN_PIPES_MAX = 32                  # 32 MiB of pipe: half the kernel's per-user soft limit


def grow_pipe(fd):
    """A busy stream gets a 1 MiB pipe (the kernel's default pipe-max-size): each
    wakeup then carries up to 16 times more, which lifts log-file throughput from
    a few hundred MB/s to over 1 GB/s.  Only busy pipes grow, and only so many:
    pipe sizes are charged to the user (fs.pipe-user-pages-soft, 64 MiB), and past
    that limit the kernel gives every new pipe of the user a single page."""
    try:
        fcntl.fcntl(fd, getattr(fcntl, "F_SETPIPE_SZ", 1031), 1 << 20)
        return True
    except OSError:
        return False


def tail_file(path, n):
    """The last n lines of a file, read from its end."""
    try:
        with open(path, "rb") as f:
            f.seek(0, 2)
            end = f.tell()
            size = min(end, max(4096, n * 512))
            while True:
                f.seek(end - size)
                data = f.read(size)
                if data.count(b"\n") > n or size == end:
                    break
                size = min(end, size * 4)
    except OSError:
        return []
    lines = data.decode("utf-8", "replace").splitlines()
    return lines[-n:] if n else []


def log_tail(sup, svc, stream, n):
    """(lines, error) for `log NAME [--stderr] -n N`.  stream None: where stdout
    goes, its file or the memory tail (which holds stderr too when stderr is
    prefixed as well: the lines as they came), or stderr's for a service whose
    stdout is not kept; "stderr": the stderr alone."""
    if stream == "stderr":
        target = svc.program.stream_target("stderr")
        if target == "merged":
            return None, "%s's stderr goes into its stdout (redirect_stderr = true): log %s shows both" % (
                svc.name, svc.name)
        if target == "none":
            return None, "%s's stderr is not kept (stderr_logfile = none)" % svc.name
        sink = sup.sink_for(svc.name, "stderr")
        tail = sup.live[svc.name].err_tail
    else:
        kept = svc.program.stream_target("stdout") != "none"
        sink = sup.sink_for(svc.name, "stdout" if kept else "stderr")
        tail = sup.live[svc.name].tail
    if sink is not None:
        return tail_file(sink.path, n), None
    return (list(tail or ())[-n:] if n else []), None


# ---------------------------------------------------------------------------
# Event listeners: supervisord's [eventlistener:x] protocol
# ---------------------------------------------------------------------------
# A listener is a service whose stdin gets events and whose stdout answers.
# It writes READY\n; we send one header line and the payload; it answers
# RESULT <len>\n<result>, OK acknowledging the event, anything else asking for
# it again later; then READY again.  Each [eventlistener:x] is a pool (its
# numprocs instances share one buffer of buffer_size events, the oldest
# dropped on overflow), as in supervisord 4 (supervisor/process.py,
# dispatchers.py, events.py).

EVENT_RETRY = 1.0                 # a rejected event waits this long before it is sent again
MAX_RESULT = 64 * 1024            # a longer RESULT is a protocol error, not a buffer to fill
TICK_PERIODS = {"TICK_5": 5, "TICK_60": 60, "TICK_3600": 3600}


def event_matches(subscribed, eventname):
    """Is an event of this type wanted by a pool subscribed to these types?"""
    while eventname is not None:
        if eventname in subscribed:
            return True
        eventname = EVENT_TYPES.get(eventname)
    return False


def format_event(server, serial, pool, poolserial, eventname, payload):
    """The bytes a listener reads for one event: supervisord's header line, then
    exactly len bytes of payload (no newline after it)."""
    body = payload.encode("utf-8", "replace")
    head = "ver:3.0 server:%s serial:%d pool:%s poolserial:%d eventname:%s len:%d\n" % (
        server, serial, pool, poolserial, eventname, len(body))
    return head.encode() + body


def state_payload(processname, groupname, from_state, extra=()):
    """PROCESS_STATE_* payload: `processname:x groupname:y from_state:Z` and extras."""
    fields = [("processname", processname), ("groupname", groupname),
              ("from_state", from_state)] + list(extra)
    return " ".join("%s:%s" % kv for kv in fields)


def process_state_events(old, new):
    """The supervisord transitions a change of ours stands for: [(new, old)].

    Our policy takes a few steps in one (a crashed service restarts straight
    from RUNNING, the last failed start goes straight to FATAL); a listener
    sees the states supervisord would have passed through."""
    if old == new:
        return []
    if old == RUNNING and new in (STARTING, BACKOFF):
        return [(EXITED, RUNNING), (new, EXITED)]
    if old == STARTING and new == FATAL:
        return [(BACKOFF, STARTING), (FATAL, BACKOFF)]
    return [(new, old)]


class ListenerProtocol:
    """What a listener writes on its stdout, read as supervisord reads it.

    feed() returns what happened: ("ready", None), ("result", bytes) or
    ("error", why).  After an error the listener is UNKNOWN: it gets no more
    events until a new process replaces it."""

    ACKNOWLEDGED, READY, BUSY, UNKNOWN = "ACKNOWLEDGED", "READY", "BUSY", "UNKNOWN"
    TOKEN = b"READY\n"

    def __init__(self, state=ACKNOWLEDGED, buf=b"", resultlen=None):
        self.state, self.buf, self.resultlen = state, buf, resultlen

    def sent(self):
        self.state = self.BUSY

    def feed(self, data):
        self.buf += data
        out = []
        while self.buf and self.state != self.UNKNOWN:
            if self.state == self.ACKNOWLEDGED:
                if not self.buf.startswith(self.TOKEN[:len(self.buf)]):
                    out.append(self._error("wrote %r where READY was expected" % self.buf[:40]))
                elif len(self.buf) >= len(self.TOKEN):
                    self.buf = self.buf[len(self.TOKEN):]
                    self.state = self.READY
                    out.append(("ready", None))
                else:
                    break
            elif self.state == self.READY:
                out.append(self._error("wrote %r while no event was sent to it" % self.buf[:40]))
            elif self.resultlen is None:
                line, nl, rest = self.buf.partition(b"\n")
                if not nl:
                    if len(self.buf) > 64 or not b"RESULT ".startswith(self.buf[:7]):
                        out.append(self._error("bad result line %r" % self.buf[:40]))
                    break
                size = line[7:]
                if not line.startswith(b"RESULT ") or not size.isdigit() or int(size) > MAX_RESULT:
                    out.append(self._error("bad result line %r (expected RESULT 2 then OK)"
                                           % line[:40]))
                    break
                self.buf, self.resultlen = rest, int(size)
            elif len(self.buf) >= self.resultlen:
                result, self.buf = self.buf[:self.resultlen], self.buf[self.resultlen:]
                self.resultlen = None
                self.state = self.ACKNOWLEDGED
                out.append(("result", result))
            else:
                break
        if self.state == self.UNKNOWN:
            self.buf = b""
        return out

    def _error(self, why):
        self.state = self.UNKNOWN
        self.buf, self.resultlen = b"", None
        return ("error", why)


class ListenerChannel:
    """One listener process: the write end of its stdin, what is still to be
    written there, its protocol state and the event it holds."""

    def __init__(self, name, fd, protocol=None, event=None, out=b""):
        self.name, self.fd = name, fd
        self.protocol = protocol or ListenerProtocol()
        self.event = event            # [serial, poolserial, eventname, payload] being handled
        self.out = out                # envelope bytes not yet written (a full pipe)
        self.writing = False          # registered with the selector for EVENT_WRITE


class EventPool:
    """One [eventlistener:x]: its subscriptions, buffer and serial."""

    def __init__(self, name, events, buffer_size):
        from collections import deque
        self.name, self.events, self.buffer_size = name, events, buffer_size
        self.buffer = deque()         # [serial, poolserial, eventname, payload], oldest first
        self.serial = -1
        self.retry_at = 0.0           # after a rejection, nothing is sent before this


class EventHub:
    """Events from the supervisor to its listener pools.

    The supervisor calls notify / state_changed when something happens,
    attach / detach when a listener process starts and ends, output with what
    a listener wrote, and configure when the config changes.  The hub talks
    back only through the callbacks it was given: log(level, message, name),
    running(name) -> bool, restart(name, why), and the loop's timers and
    selector.  Nothing here blocks: a full stdin waits for the selector, a
    full buffer drops its oldest event."""

    def __init__(self, log, timers, selector, running, restart, server="supervisor"):
        self.log, self.timers, self.selector = log, timers, selector
        self.running, self.restart, self.server = running, restart, server
        self.pools = {}               # pool name -> EventPool
        self.members = {}             # listener service name -> pool name
        self.channels = {}            # listener service name -> ListenerChannel
        self.serial = -1              # global, across pools (supervisord's GlobalSerial)
        self.ticks = {}               # period -> last timeslice sent
        self.tick_timer = self.retry_timer = None
        self.wall = time.time         # the clock of TICK_* (a test moves it)
        self.ended = {}               # service name -> pid of its process that ended last

    # -- configuration ------------------------------------------------------

    def configure(self, programs):
        """The listener pools of a config; buffers of pools that stay are kept."""
        pools, members = {}, {}
        for prog in programs.values():
            if prog.events is None:
                continue
            members[prog.name] = prog.pool
            pool = pools.get(prog.pool) or self.pools.get(prog.pool)
            if pool is None:
                pool = EventPool(prog.pool, prog.events, prog.buffer_size)
            pool.events, pool.buffer_size = prog.events, prog.buffer_size
            pools[prog.pool] = pool
        self.pools, self.members = pools, members
        self.arm_ticks()

    def wants(self, eventname):
        return any(event_matches(p.events, eventname) for p in self.pools.values())

    def listens(self, name):
        return name in self.channels

    # -- events in ------------------------------------------------------------

    def notify(self, eventname, payload):
        """An event happened: into the buffer of every pool subscribed to it."""
        serial = None
        for pool in self.pools.values():
            if not event_matches(pool.events, eventname):
                continue
            if serial is None:
                self.serial += 1
                serial = self.serial
            pool.serial += 1
            self.accept(pool, [serial, pool.serial, eventname, payload])
            self.dispatch(pool)

    def accept(self, pool, event, head=False):
        if len(pool.buffer) >= pool.buffer_size:
            dropped = pool.buffer.popleft()
            self.log("error", "pool %s event buffer overflowed (buffer_size %d), discarding "
                     "event %d (%s)" % (pool.name, pool.buffer_size, dropped[0], dropped[2]))
        if head:
            pool.buffer.appendleft(event)
        else:
            pool.buffer.append(event)

    def state_changed(self, name, groupname, old, new, pid, tries, expected):
        """A service changed state: PROCESS_STATE_* events, as supervisord names them.
        pid: its process now (None once it ended: then the one that ended)."""
        if not self.pools:
            return
        last_pid = self.ended.get(name)
        for to, frm in process_state_events(old, new):
            if to in (STARTING, BACKOFF):
                extra = [("tries", tries)]
            elif to == EXITED:
                extra = [("expected", int(expected)), ("pid", last_pid or 0)]
            elif to in (RUNNING, STOPPING, STOPPED):
                extra = [("pid", pid or last_pid or 0)]
            else:
                extra = []
            self.notify("PROCESS_STATE_" + to, state_payload(name, groupname, frm, extra))
        pool = self.pools.get(self.members.get(name))
        if pool is not None and new == RUNNING:
            self.dispatch(pool)           # a listener may take events once RUNNING

    # -- ticks: a timer only while some pool wants them --------------------------

    def arm_ticks(self):
        periods = [p for n, p in TICK_PERIODS.items() if self.wants(n)]
        self.timers.cancel(self.tick_timer)
        self.tick_timer = None
        if not periods:
            return
        now = self.wall()
        for period in periods:
            self.ticks.setdefault(period, int(now - now % period))
        wait = min(period - now % period for period in periods)
        self.tick_timer = self.timers.at(monotonic() + wait + 0.001, self.tick)

    def tick(self):
        self.tick_timer = None
        now = self.wall()
        for name, period in sorted(TICK_PERIODS.items(), key=lambda kv: kv[1]):
            if not self.wants(name):
                continue
            this = int(now - now % period)
            if this != self.ticks.get(period):
                self.ticks[period] = this
                self.notify(name, "when:%d" % this)
        self.arm_ticks()

    # -- listener processes ------------------------------------------------------

    def process_ended(self, name, pid):
        """A service's process ended: its pid is the one PROCESS_STATE_EXITED names."""
        self.ended[name] = pid
        self.detach(name)

    def attach(self, name, fd):
        """A new process of listener `name` started, its stdin's write end is fd."""
        self.detach(name)
        self.channels[name] = ListenerChannel(name, fd)

    def detach(self, name):
        """The listener process is gone (or replaced): what it held is sent again."""
        channel = self.channels.pop(name, None)
        if channel is None:
            return
        self.release(channel, "its process ended")
        if channel.writing:
            self.selector.unregister(channel.fd)
        try:
            os.close(channel.fd)
        except OSError:
            pass

    def release(self, channel, why):
        """The event a listener held goes back to the head of its pool's buffer."""
        event, channel.event, channel.out = channel.event, None, b""
        pool = self.pools.get(self.members.get(channel.name))
        if event is not None and pool is not None:
            self.log("info", "event %d (%s) not acknowledged (%s): kept to send again"
                     % (event[0], event[2], why), channel.name)
            self.accept(pool, event, head=True)

    def output(self, name, data):
        """What listener `name` wrote on its stdout."""
        channel = self.channels.get(name)
        if channel is None:
            return
        for what, arg in channel.protocol.feed(data):
            pool = self.pools.get(self.members.get(name))
            if what == "result":
                event, channel.event = channel.event, None
                if arg != b"OK" and event is not None and pool is not None:
                    self.log("warn", "event %d (%s) rejected (result %r): sent again later"
                             % (event[0], event[2], arg[:40]), name)
                    self.accept(pool, event, head=True)
                    self.retry_later(pool)
            elif what == "error":
                self.release(channel, "protocol error")
                self.log("warn", "broke the event listener protocol: %s; restarting it" % arg, name)
                self.restart(name, "event listener protocol error")
            elif pool is not None:
                self.dispatch(pool)

    def retry_later(self, pool):
        # a listener that rejects every event must not spin with us: the
        # rejected event waits, as supervisord's "sent again later" promises
        pool.retry_at = monotonic() + EVENT_RETRY
        if self.retry_timer is None:
            self.retry_timer = self.timers.at(pool.retry_at, self.retry_due)

    def retry_due(self):
        self.retry_timer = None
        for pool in self.pools.values():
            self.dispatch(pool)

    # -- events out ---------------------------------------------------------------

    def dispatch(self, pool):
        """Send buffered events to the pool's listeners that are READY and RUNNING."""
        if monotonic() < pool.retry_at:
            if self.retry_timer is None:
                self.retry_timer = self.timers.at(pool.retry_at, self.retry_due)
            return
        while pool.buffer:
            channel = next((c for n, c in sorted(self.channels.items())
                            if self.members.get(n) == pool.name and c.event is None
                            and c.protocol.state == ListenerProtocol.READY and self.running(n)),
                           None)
            if channel is None:
                return
            event = pool.buffer.popleft()
            channel.event = event
            channel.protocol.sent()
            channel.out = format_event(self.server, event[0], pool.name, event[1], event[2], event[3])
            self.flush(channel)

    def flush(self, channel, mask=None):
        try:
            while channel.out:
                channel.out = channel.out[os.write(channel.fd, channel.out):]
        except BlockingIOError:
            pass
        except OSError as exc:        # EPIPE: it closed its stdin, or is dying
            channel.out = b""
            self.release(channel, "cannot write to its stdin: %s" % exc.strerror)
            channel.protocol.state = ListenerProtocol.UNKNOWN
            self.restart(channel.name, "event listener stdin closed")
            return
        want = bool(channel.out)
        if want != channel.writing:
            if want:
                self.selector.register(channel.fd, selectors.EVENT_WRITE,
                                       lambda mask, c=channel: self.flush(c, mask))
            else:
                self.selector.unregister(channel.fd)
            channel.writing = want

    # -- re-execution --------------------------------------------------------------

    def handoff(self):
        import base64
        b64 = lambda b: base64.b64encode(b).decode()
        return {
            "serial": self.serial, "ticks": [[k, v] for k, v in self.ticks.items()],
            "pools": {n: {"serial": p.serial, "buffer": list(p.buffer)} for n, p in self.pools.items()},
            "channels": [{"name": c.name, "fd": c.fd, "state": c.protocol.state,
                          "buf": b64(c.protocol.buf), "resultlen": c.protocol.resultlen,
                          "event": c.event, "out": b64(c.out)} for c in self.channels.values()],
        }

    def take_over(self, state):
        import base64
        if not state:
            return
        self.serial = state.get("serial", -1)
        self.ticks.update({k: v for k, v in state.get("ticks", ())})
        for name, entry in state.get("pools", {}).items():
            pool = self.pools.get(name)
            if pool is not None:
                pool.serial = entry["serial"]
                for event in entry["buffer"]:
                    self.accept(pool, event)
        for entry in state.get("channels", ()):
            protocol = ListenerProtocol(entry["state"], base64.b64decode(entry["buf"]),
                                        entry["resultlen"])
            channel = ListenerChannel(entry["name"], entry["fd"], protocol, entry["event"],
                                      base64.b64decode(entry["out"]))
            os.set_blocking(channel.fd, False)
            self.channels[channel.name] = channel
            if channel.out:
                self.flush(channel)
        self.arm_ticks()

    @staticmethod
    def handoff_fds(state):
        return [c["fd"] for c in (state or {}).get("channels", ())]

    def close(self):
        for name in list(self.channels):
            channel = self.channels.pop(name)
            if channel.writing:
                self.selector.unregister(channel.fd)
            os.close(channel.fd)


# ---------------------------------------------------------------------------
# Event loop: timers, the supervisor (events in, effects out), probes
# ---------------------------------------------------------------------------

class Selector(selectors.DefaultSelector):
    """The loop's selector: selectors' own (epoll), which a re-exec hands over.

    At 5000 services the new image registers 15 000 fds (pipes, pidfds), one
    epoll_ctl each, most of the handoff's last part.  The old image's epoll
    instance already holds them, at the same fd numbers: the old image takes
    out what it does not hand over and keeps the instance across the exec; the
    new one takes it as its own (`inherited`: fd -> events registered), and a
    register() of an fd it holds costs no syscall.  What nobody claims is taken
    out once the takeover is done (settle)."""

    def __init__(self, inherited=None):
        super().__init__()
        self.inherited = {}
        if inherited is not None:
            epfd, registered = inherited
            own, self._selector = self._selector, selectors.select.epoll.fromfd(epfd)
            own.close()
            self.inherited = {fd: events for fd, events in registered}

    def poller(self):
        """The epoll object, when this is an epoll selector of the shape we know."""
        poller = getattr(self, "_selector", None)
        return poller if isinstance(poller, getattr(selectors.select, "epoll", ())) and \
            isinstance(getattr(self, "_fd_to_key", None), dict) else None

    def _mask(self, events):
        return (self._EVENT_READ if events & selectors.EVENT_READ else 0) | \
            (self._EVENT_WRITE if events & selectors.EVENT_WRITE else 0)

    def register(self, fileobj, events, data=None):
        if self.inherited:
            try:
                fd = fileobj if type(fileobj) is int else fileobj.fileno()
            except (AttributeError, ValueError, OSError):
                fd = None
            if fd in self.inherited and fd not in self._fd_to_key and events and \
                    not events & ~(selectors.EVENT_READ | selectors.EVENT_WRITE):
                held = self.inherited.pop(fd)
                if held != events:
                    self._selector.modify(fd, self._mask(events))
                key = selectors.SelectorKey(fileobj, fd, events, data)
                self._fd_to_key[fd] = key
                return key
        return super().register(fileobj, events, data)

    def settle(self):
        """After the takeover: the fds handed over that nobody claimed leave epoll."""
        for fd in self.inherited:
            try:
                self._selector.unregister(fd)
            except OSError:
                pass
        self.inherited = {}

    def release(self, kept):
        """Before an exec: take out of epoll every fd not handed over, and return
        (epoll fd, [[fd, events]...] still in it, keys taken out) or None."""
        poller = self.poller()
        if poller is None:
            return None
        registered, removed = [], []
        for fd, key in list(self._fd_to_key.items()):
            if fd in kept:
                registered.append([fd, key.events])
            else:
                try:
                    poller.unregister(fd)
                except OSError:
                    pass
                removed.append(key)
        return poller.fileno(), registered, removed

    def restore_released(self, removed):
        """The exec failed: what release() took out goes back."""
        for key in removed:
            try:
                self._selector.register(key.fd, self._mask(key.events))
            except OSError:
                pass


def inherited_epoll(state):
    """The epoll instance a handoff state hands over, if it is one: (fd, registered)."""
    entry = (state.get("fds") or {}).get("epoll")
    if not entry:
        return None
    try:
        if os.readlink("/proc/self/fd/%d" % entry[0]) != "anon_inode:[eventpoll]":
            return None                # rolled back to: the failed image closed it
    except OSError:
        return None
    return entry[0], entry[1]


class Timers:
    """A heap of (when, seq, callback); cancelled entries are skipped when due."""

    def __init__(self):
        self.heap, self.seq = [], itertools.count()

    def at(self, when, callback, *args):
        entry = [when, next(self.seq), callback, args]
        heapq.heappush(self.heap, entry)
        return entry

    @staticmethod
    def cancel(entry):
        if entry is not None:
            entry[2] = None

    def timeout(self, now):
        while self.heap and self.heap[0][2] is None:
            heapq.heappop(self.heap)
        # at most MAX_WAIT: epoll takes an int of milliseconds (24.8 days), and a
        # timer 30 days away would overflow it
        return min(MAX_WAIT, max(0.0, self.heap[0][0] - now)) if self.heap else MAX_WAIT

    def run_due(self, now):
        while self.heap and self.heap[0][0] <= now:
            when, _, callback, args = heapq.heappop(self.heap)
            if callback is not None:
                callback(*args)


def default_logdir():
    if os.geteuid() == 0:
        return "/var/log/respawn"
    base = os.environ.get("XDG_STATE_HOME") or os.path.expanduser("~/.local/state")
    return os.path.join(base, "respawn")


def batched(method):
    """A Supervisor method that feeds events: what depends on several services
    is settled once, when the outermost one returns, never between two events."""
    def run(self, *args, **named):
        self.depth += 1
        try:
            result = method(self, *args, **named)
        finally:
            self.depth -= 1
        if self.depth == 0 and self.settle_due:
            self.settle()
        return result
    run.__name__ = method.__name__
    run.__doc__ = method.__doc__
    return run


class Live:
    """A service's live handles, beside its record: timers by slot, probes in
    flight, its notify socket, the recent lines `log` shows, and what its process
    is beyond its pid (for adoption after a crash: handed over, not policy data)."""

    __slots__ = ("timers", "probes", "notify", "tail", "err_tail", "starttime", "adopted", "marker")

    def __init__(self):
        self.timers = {}              # slot -> Timers entry
        self.probes = None            # 'ready' / 'health' -> Probe, once a probe ran
        self.notify = None            # (socket, address) for $NOTIFY_SOCKET
        self.tail = None              # deque of recent lines (prefixed output only)
        self.err_tail = None          # the stderr lines among them alone, for `log --stderr`
        self.starttime = None         # its process's start time (proc_start_time)
        self.adopted = False          # started by a supervisor before us: not our child
        self.marker = None            # the SERVICE_MARKER it got (1.0.0 gave none)


class _ChildExit:
    """What the watcher calls when a service's process exited: a fifth of a
    closure's size, per service."""

    __slots__ = ("sup", "svc")

    def __init__(self, sup, svc):
        self.sup, self.svc = sup, svc

    def __call__(self, pid, status):
        self.sup.on_child_exit(pid, status, self.svc)


class Supervisor:
    """Holds the services and runs the loop: wait for events, dispatch them to
    the policy (feed), perform what it decides (perform), repeat.

    Hooks for other parts: `on_state_change` (callbacks (svc, old, new), called
    on every state change of every service), `status_json()` (the snapshot of
    everything), and the narrow interface helpers use instead of our insides:
    call_at / cancel_timer / watch_fd / unwatch_fd / watch_helper / abandon_helper."""

    def __init__(self, config, script, argv, source=None, selector=None):
        self.config = config
        self.script = script                  # absolute, resolved at start-up
        self.argv = argv                      # our command line, without handoff options
        self.source = source                  # the code now running (Packed), for a rollback
        self.hash = sha256(source.data()).hexdigest() if source else None
        self.rejected_hash = None
        self.selector = selector if selector is not None else Selector()
        self.timers = Timers()
        self.services = {}                    # name -> Service (the plain records)
        self.live = {}                        # name -> Live (their handles)
        self.state_file = None                # StateFile, for adoption after a crash
        for prog in config.programs.values():
            self.add_service(prog)
        self.context = Context(blockers=lambda svc: start_blockers(svc, self.services))
        self.on_state_change = []             # subscribers: callback(svc, old, new)
        self.depth = 0                        # feed() nesting: settle only at the outermost
        self.settle_due = False
        self.readiness_due = False
        self.pipes = {}                       # fd -> Pipe
        self.pipe_reader = self.on_pipe       # what every Pipe calls when readable
        self.pipes_of = {}                    # service name -> its Pipes (no scan per exit)
        self.grown_pipes = 0                  # pipes enlarged by grow_pipe
        self.sinks = {}                       # (service name, stream) -> LogFile
        self.unopened = {}                    # (service name, stream) -> when its open failed
        self.started = time.time()
        self.reexecs = 0
        self.pid1 = os.getpid() == 1
        self.reaper = self.pid1 or config.settings["subreaper"]
        self.watcher = make_watcher(self.selector, self.reaper)
        self.done = False
        self.exit_code = EXIT_OK
        self.waves = []                       # stop waves still to run
        self.release_due = False              # a release of freed memory is due (release_memory_soon)
        self.after_waves = None
        self.wave_begun = None                # the wave already signalled (advance_waves)
        self.waiters = []                     # control clients waiting for states
        self.followers = {}                   # service name -> [client] for `log -f`
        self.clients = {}                     # fd -> ControlClient
        self.listener = None
        self.accept_paused = None             # the timer that re-arms a paused listener
        self.accept_trouble = None            # why accept() failed, until it works again
        self.lock_fd = None
        self.log_fd = 2
        self.log_out = None                   # Writer of our own log (stderr or logfile)
        self.streams = {}                     # 1, 2 -> Writer of our stdout and stderr
        self.log_dropped = 0                  # bytes of our own log we could not write
        self.notify_parent = None             # $NOTIFY_SOCKET of systemd, for READY=1
        self.systemd = None                   # SystemdNotifier, when systemd watches us
        self.metrics = None                   # MetricsServer, with `metrics = HOST:PORT`
        self.hooks = None                     # HookRunner, with `on_change = CMD`
        self.hooks_deadline = None            # how long the exit waits for hooks
        self.daemon_log = None                # run --daemon: the file our stdout/stderr go to
        self.file_watch = None
        self.reexec_busy = False
        self.reexec_client = None
        self.reexec_code = None               # (hash, code object, source) the trial checked
        self.signals_due = []                 # drained from the wakeup fd, not yet handled
        self.maybe_waiting = True             # a service may wait for what it requires
        self.helpers = {}                     # pid -> purpose, for trial checks and probes
        self.helper_done = {}                 # pid -> callback(pid, status)
        self.shutdown_clients = []            # told when the supervisor has stopped
        self.reexeced = None                  # wall time of the last re-exec
        self.pidfile = None
        self.adopted_watch = None             # AdoptedWatch, once a process was adopted
        self.marker = marker_prefix(config.path)
        self.events = EventHub(self.log, self.timers, self.selector,
                               lambda name: name in self.services and self.services[name].state == RUNNING,
                               self.listener_broke)
        self.events.configure(config.programs)
        self.on_state_change.append(self.listener_events)
        self.supervisord_env = is_supervisord_config(config)
        self.apply_settings()

    @property
    def shutting_down(self):
        return self.context.shutting_down

    def add_service(self, prog):
        svc = self.services[prog.name] = Service(prog)
        self.live[prog.name] = Live()
        if self.state_file is not None:
            self.state_file.changed()
        return svc

    # -- logging ----------------------------------------------------------

    def apply_settings(self):
        s = self.config.settings
        self.loglevel = LOG_LEVELS[s["loglevel"]]
        self.json_logs = s["log_format"] == "json"
        self.journal = journal_stream_is(2)
        self.reopen_log()
        self.context.exit_on_fatal = s["exit_on_fatal"]

    def reopen_log(self):
        path = self.config.settings["logfile"]
        new = 2
        if path:
            try:
                os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
                new = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC
                              | os.O_NONBLOCK, 0o644)
            except OSError as exc:
                self.log("error", "cannot open logfile %s: %s; logging to stderr" % (path, exc.strerror))
        old, old_fd = self.log_out, self.log_fd
        self.log_fd = new
        self.log_out = self.stream(2) if new == 2 else self.writer(new, "the logfile %s" % path)
        if old_fd != 2:
            if old.failing and old.name == self.log_out.name:
                # the same file reopened (a reload, SIGUSR1) while it drops lines: the
                # episode goes on, so that its end is said, with all it dropped
                self.log_out.go_on_from(old)
            old.close()
            os.close(old_fd)

    def stream(self, fd):
        """The Writer of our stdout (1) or stderr (2); one for both if they are one file."""
        out = self.streams.get(fd)
        if out is None:
            other = self.streams.get(3 - fd)
            try:
                same = other is not None and os.path.sameopenfile(fd, 3 - fd)
            except OSError:
                same = False
            if same:
                out, other.name = other, "stdout and stderr"
            else:
                out = self.writer(fd, "stdout" if fd == 1 else "stderr")
            self.streams[fd] = out
        return out

    def writer(self, fd, name):
        out = Writer(fd, name, selector=self.selector, timers=self.timers)
        out.report = lambda level, message: self.output_trouble(out, level, message)
        return out

    def output_trouble(self, out, level, message):
        if out is not self.log_out:
            self.log(level, message)
        elif not out.failing:
            self.log(level, message)      # recovered: the log says what it missed
        elif out is not self.stream(2):
            # our log cannot tell of its own trouble while it lasts; stderr can
            self.stream(2).write(self.log_line(level, message, None))

    def log_line(self, level, message, service):
        now = time.time()
        if self.journal and self.log_fd == 2 and not self.json_logs:
            # journald stamps each line itself; the prefix is its priority (sd-daemon(3))
            line = "<%d>%s%s\n" % (JOURNAL_PRIORITY[level], (service + ": ") if service else "", message)
        elif self.json_logs:
            line = json.dumps({"time": round(now, 3), "service": service, "stream": "supervisor",
                               "level": level, "message": message}) + "\n"
        else:
            stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(now))
            line = "%s.%03d %-5s %s%s\n" % (stamp, int(now * 1000) % 1000, level.upper(),
                                             (service + ": ") if service else "", message)
        return line.encode("utf-8", "replace")

    def drain_output(self, timeout):
        """At exit: give a slow reader of our outputs a moment for what waits."""
        for out in set(self.streams.values()) | {self.log_out}:
            if out is not None:
                out.drain(timeout)

    def carry_output(self):
        """For a re-exec: what waits in our writers (a slow reader of our stdout,
        a line's tail on a full disk), which the new image writes before its own."""
        out, done = {}, set()
        for fd in (1, 2):
            w = self.streams.get(fd)
            if w is not None and w not in done:
                done.add(w)
                out[str(fd)] = w.carry()
        if self.log_out is not None and self.log_out not in done:
            out["log"] = self.log_out.carry()
        out["sinks"] = [[name, stream, sink.out.carry()] for (name, stream), sink in self.sinks.items()
                        if sink.out.pending or sink.out.skip]
        return {k: v for k, v in out.items() if v}

    def take_output(self, carried):
        """The new image: each writer takes what its predecessor carried (carry_output)."""
        for key, state in carried.items():
            if key in ("1", "2"):
                self.stream(int(key)).take(state)
            elif key == "log":
                (self.log_out or self.stream(2)).take(state)
        for name, stream, state in carried.get("sinks", ()):
            sink = self.sink_for(name, stream)
            if sink is not None:
                sink.out.take(state)
                sink.at_line_start = not (sink.out.pending or sink.out.open_line)
            elif state.get("pending"):       # no file to finish the line in: counted as dropped
                import base64
                self.count_dropped(name, len(base64.b64decode(state["pending"])))

    def log(self, level, message, service=None):
        if LOG_LEVELS[level] < self.loglevel:
            return
        # never blocks, never raises: a full disk or a stalled reader drops lines (counted)
        self.log_dropped += (self.log_out or self.stream(2)).write(self.log_line(level, message, service))

    # -- the loop ---------------------------------------------------------

    def install_signals(self):
        """Handlers only wake the loop (wakeup fd); the loop does the work (research F9)."""
        self.wake_r, self.wake_w = os.pipe()
        os.set_blocking(self.wake_r, False)
        os.set_blocking(self.wake_w, False)
        self.selector.register(self.wake_r, selectors.EVENT_READ, self.on_wakeup)
        for name in HANDLED_SIGNALS:
            signum = getattr(signal, name)
            if signum == signal.SIGCHLD and not self.watcher.needs_sigchld:
                signal.signal(signum, signal.SIG_DFL)   # never SIG_IGN: it would auto-reap
            else:
                signal.signal(signum, _note_signal)
        # Anything our launcher ignored (nohup ignores HUP, shells TTOU...) goes back
        # to default so that services inherit a clean slate; PIPE and XFSZ are
        # CPython's own and restore_signals resets them in each child.
        for signum in signal.valid_signals():
            if signum in (signal.SIGPIPE, signal.SIGXFSZ, signal.SIGKILL, signal.SIGSTOP):
                continue
            try:
                if signal.getsignal(signum) == signal.SIG_IGN:
                    signal.signal(signum, signal.SIG_DFL)
            except (OSError, ValueError):
                pass
        signal.set_wakeup_fd(self.wake_w, warn_on_full_buffer=False)
        signal.pthread_sigmask(signal.SIG_SETMASK, [])

    def run_loop(self):
        select, timers, registered = self.selector.select, self.timers, self.selector.get_map()
        while not self.done:
            try:
                for key, mask in select(timers.timeout(monotonic())):
                    # an earlier handler of this batch may have closed this fd (and a new
                    # one may even have reused its number): dispatch only live keys
                    if registered.get(key.fd) is key:
                        key.data(mask)
                timers.run_due(monotonic())
            except Exception as exc:
                self.internal_error(exc)

    def internal_error(self, exc):
        """A bug in a handler: say where, and keep supervising.  Dying would leave
        every service running with nobody watching (and a keep-alive cron line
        would then start them twice).  What the batch had left is still pending:
        the selector reports it again and the timers stay in the heap."""
        import traceback
        where = traceback.extract_tb(exc.__traceback__)[-1]
        self.log("error", "internal error at %s:%d (%s): %s: %s; supervision goes on (please report it)"
                 % (os.path.basename(where.filename), where.lineno, where.name, type(exc).__name__, exc))
        time.sleep(0.05)          # a fault that repeats on every turn must not spin a CPU

    def on_wakeup(self, mask=None):
        # kept on self until handled: when one of them ends in an exec (SIGCHLD
        # from a finished trial check), the rest go into the handoff, not away
        self.signals_due = self.drain_wakeup()
        while self.signals_due:
            self.on_signal(self.signals_due.pop(0))

    def drain_wakeup(self):
        got = []
        while True:
            try:
                data = os.read(self.wake_r, 512)
            except BlockingIOError:
                break
            if not data:
                break
            got.extend(data)
        # one SIGCHLD is enough however many arrived; keep the order of the rest
        seen, ordered = set(), []
        for s in got:
            if s == signal.SIGCHLD and s in seen:
                continue
            seen.add(s)
            ordered.append(s)
        return ordered

    def on_signal(self, signum):
        if signum == signal.SIGCHLD:
            self.watcher.sigchld()
        elif signum in (signal.SIGTERM, signal.SIGINT, signal.SIGQUIT):
            self.log("info", "got %s: stopping every service" % signal_name(signum))
            self.shutdown()
        elif signum == signal.SIGHUP:
            self.reload()
        elif signum == signal.SIGUSR1:
            self.log("info", "got SIGUSR1: reopening log files")
            ops_reopen(self)
            self.reopen_log()
            for sink in self.sinks.values():
                sink.reopen()
        elif signum == signal.SIGUSR2:
            self.request_reexec("SIGUSR2")

    # -- the narrow interface of helpers (probes, file watch) -------------------

    def call_at(self, when, callback, *args):
        return self.timers.at(when, callback, *args)

    def cancel_timer(self, entry):
        self.timers.cancel(entry)

    def watch_fd(self, fileobj, events, callback):
        self.selector.register(fileobj, events, callback)

    def unwatch_fd(self, fileobj):
        try:
            self.selector.unregister(fileobj)
        except (KeyError, ValueError):
            pass

    def watch_helper(self, pid, purpose, callback):
        """A process of ours that is not a service (a probe, a trial check)."""
        self.helpers[pid] = purpose
        self.helper_done[pid] = callback
        self.watcher.watch(pid, self.helper_exited)

    def helper_exited(self, pid, status):
        self.helpers.pop(pid, None)
        callback = self.helper_done.pop(pid, None)
        if callback is not None:
            callback(pid, status)

    def abandon_helper(self, pid):
        """Nobody waits for this helper any more; it is still reaped (and handed over)."""
        self.helpers.pop(pid, None)
        self.helper_done.pop(pid, None)
        self.watcher.abandon(pid)

    # -- the lifecycle: events in, effects out ----------------------------

    @batched
    def feed(self, svc, event):
        """Every event of every service passes here: the policy decides (step),
        we perform.  What depends on several services (waiting for requires,
        stop waves, waiting clients, container exit) is settled once the outermost
        event is done."""
        self.perform(svc, step(svc, event, monotonic(), self.context))
        if self.state_file is not None:
            self.state_file.changed(svc.name)     # what was asked, restarts: not only states
        if svc.waiting_for:
            self.maybe_waiting = True

    def perform(self, svc, effects):
        for effect in effects:
            PERFORM[type(effect)](self, svc, effect)

    def state_changed(self, svc, old, new):
        """The one place every state change passes: subscribers, then what waits on states."""
        for callback in self.on_state_change:
            callback(svc, old, new)
        if new == RUNNING:
            self.readiness_due = True
        self.settle_due = True

    def settle(self):
        self.depth += 1
        try:
            while self.settle_due:
                self.settle_due = False
                if self.readiness_due:
                    self.readiness_due = False
                    self.start_waiting()
                self.advance_waves()
                if self.waiters:
                    self.check_waiters()
                self.check_all_done()
        finally:
            self.depth -= 1

    def do_spawn(self, svc, effect):
        prog = svc.program
        fds = []
        import subprocess
        try:
            out_w = err_w = subprocess.DEVNULL
            streams = {}
            for stream in ("stdout", "stderr"):
                target = prog.stream_target(stream)
                if target in ("none", "merged") and not (stream == "stdout" and prog.events):
                    continue
                r, w = os.pipe()
                fds += [w, r]
                r = fds[-1] = hold_above(r)
                streams[stream] = r
                if stream == "stdout":
                    out_w = w
                else:
                    err_w = w
            if prog.stream_target("stderr") == "merged":
                err_w = out_w if out_w != subprocess.DEVNULL else subprocess.STDOUT
            extra = {SERVICE_MARKER: "%s/%s" % (self.marker, svc.name)}
            stdin = None
            if prog.events is not None:
                stdin, stdin_w = os.pipe()
                fds += [stdin, stdin_w]       # the child's end first: closed with the others below
            if prog.events is not None or self.supervisord_env:
                extra.update(self.supervisor_env(svc))
            if prog.ready[0] == "notify":
                extra["NOTIFY_SOCKET"] = self.notify_socket(svc)
                if prog.watchdog:
                    extra["WATCHDOG_USEC"] = str(int(prog.watchdog * 1e6))
            pid = spawn(prog, out_w, err_w, extra, hold=streams.values(), stdin=stdin)
        except (SpawnError, OSError) as exc:
            for fd in fds:
                os.close(fd)
            message = str(exc) if isinstance(exc, SpawnError) else "cannot start: %s" % exc
            self.feed(svc, SpawnFailed(message))
            return
        for fd in fds[0::2]:
            os.close(fd)
        if stdin is not None:
            os.set_blocking(stdin_w, False)
            self.events.attach(svc.name, stdin_w)
        for stream, r in streams.items():
            self.add_pipe(Pipe(r, svc.name, stream, held=(pid, r)))
        live = self.live[svc.name]        # what adoption after a crash needs of the process
        live.starttime, live.adopted, live.marker = proc_start_time(pid), False, extra[SERVICE_MARKER]
        self.watcher.watch(pid, self.child_callback(svc))
        import shlex
        self.log("info", "started pid %d: %s" % (pid, shlex.join(prog.command)), svc.name)
        self.feed(svc, Spawned(pid, time.time()))

    def child_callback(self, svc):
        return _ChildExit(self, svc)

    def on_child_exit(self, pid, status, svc):
        if svc.pid != pid:
            return
        self.drain_service_pipes(svc)
        self.events.process_ended(svc.name, pid)
        self.feed(svc, Exited(status))

    def do_signal(self, svc, effect):
        kill_group_or_pid(effect.pid, effect.sig, effect.group)

    def do_kill(self, svc, effect):
        try:
            os.kill(svc.pid, 0)
        except ProcessLookupError:
            # reaped (by us: nobody else can) but its exit never reached the
            # policy, which only a bug in a handler can do: gone, not waited on forever
            self.log("error", "pid %d is gone but its exit was not handled" % svc.pid, svc.name)
            self.feed(svc, Exited(None, "gone"))
            return
        except OSError:
            pass
        self.log("warn", "still alive after %gs: SIGKILL" % svc.program.stopwaitsecs, svc.name)
        kill_group_or_pid(svc.pid, signal.SIGKILL, svc.program.killasgroup)

    def do_arm(self, svc, effect):
        timers = self.live[svc.name].timers
        slot = slot_of(effect.what)
        self.timers.cancel(timers.pop(slot, None))
        if effect.when is not None:
            timers[slot] = self.timers.at(effect.when, self.feed, svc, Deadline(effect.what))

    def do_start_probe(self, svc, effect):
        prog, kind = svc.program, effect.kind
        ready = kind == "ready"
        spec = prog.ready if ready else prog.healthcheck
        timeout = min(5.0, prog.ready_timeout) if ready else prog.healthcheck_interval
        live = self.live[svc.name]
        if live.probes is None:
            live.probes = {}
        probes = live.probes
        old = probes.pop(kind, None)
        if old is not None:
            old.cancel()

        def done(ok, why=None):
            if probes.get(kind) is probe:
                del probes[kind]
                self.feed(svc, ProbeDone(kind, ok, why))
        probe = probes[kind] = Probe(spec, prog, timeout, done, self)
        probe.start()

    def do_cancel_probes(self, svc, effect):
        probes = self.live[svc.name].probes
        while probes:
            probes.popitem()[1].cancel()

    def do_log(self, svc, effect):
        self.log(effect.level, effect.message, svc.name)

    def do_state_changed(self, svc, effect):
        self.state_changed(svc, effect.old, effect.new)

    def do_forget(self, svc, effect):
        self.forget_service(svc)
        self.settle_due = True

    def do_exit_on_fatal(self, svc, effect):
        self.log("error", "exit_on_fatal: stopping everything")
        self.exit_code = EXIT_FAIL
        self.shutdown()

    # -- event listeners ------------------------------------------------------

    def listener_events(self, svc, old, new):
        """Subscribed to every state change: PROCESS_STATE_* for the listeners."""
        if self.events.pools:
            prog = svc.program
            self.events.state_changed(svc.name, prog.group_name, old, new, svc.pid, svc.failures,
                                      svc.exitstatus in prog.exitcodes)

    def listener_broke(self, name, why):
        """A listener wrote garbage or closed its stdin: a new process, by its policy."""
        svc = self.services.get(name)
        if svc is not None:
            self.feed(svc, ListenerBroke(why))

    def supervisor_env(self, svc):
        """What supervisord puts in every process's environment: given to listeners
        (those built on supervisor.childutils refuse to run without it) and to every
        service of a supervisord file.  There is no XML-RPC server here: the URL
        names our control socket."""
        where = self.listener.getsockname() if self.listener is not None else socket_path(self.config)
        return {"SUPERVISOR_ENABLED": "1", "SUPERVISOR_PROCESS_NAME": svc.name,
                "SUPERVISOR_GROUP_NAME": svc.program.group_name,
                "SUPERVISOR_SERVER_URL": "unix://" + where}

    # -- what depends on several services -------------------------------------

    @batched
    def start_all(self):
        """Start every wanted service: ascending priority, requires waits for readiness."""
        for svc in sorted(self.services.values(), key=lambda s: (s.program.priority, s.name)):
            if svc.want == UP and not svc.alive() and svc.state != BACKOFF:
                self.feed(svc, Want(UP))

    @batched
    def start_waiting(self):
        # called each time a service becomes ready: sorting every service each time
        # made starting 500 of them quadratic, so only those waiting are looked at
        if not self.maybe_waiting:
            return
        waiting = lambda s: s.want == UP and s.state == STOPPED and s.waiting_for
        found = [s for s in self.services.values() if waiting(s)]
        self.maybe_waiting = bool(found)
        for other in sorted(found, key=lambda s: (s.program.priority, s.name)):
            if waiting(other):
                self.feed(other, Want(UP))

    def release_memory_soon(self):
        """After a burst of work (the start, a takeover, a reload, the state file
        encoded whole): give the heap's freed pages back once this turn's work is
        done, including the state file's write, which is due now too and sorts first."""
        if not self.release_due:
            self.release_due = True
            self.timers.at(monotonic(), self._release_memory)

    def _release_memory(self):
        self.release_due = False
        release_free_memory()

    def check_all_done(self):
        """Container mode: nothing runs and nothing will: exit, 0 only if all succeeded."""
        if not (self.pid1 or self.config.settings["exit_on_fatal"]) or self.shutting_down:
            return
        svcs = list(self.services.values())
        if not svcs or any(s.alive() or s.state in (BACKOFF, STARTING, STOPPING)
                           or (s.want == UP and s.state == STOPPED) for s in svcs):
            return
        ok = all(s.state != FATAL and (s.state != EXITED or s.exitstatus in s.program.exitcodes)
                 for s in svcs)
        self.log("info", "every service has exited; exiting %s" % ("0" if ok else "1"))
        self.exit_code = EXIT_OK if ok else EXIT_FAIL
        self.shutdown()

    @batched
    def stop_many(self, names, then=None):
        """Stop services wave by wave (reverse priority, dependants first)."""
        self.waves.extend(stop_waves([n for n in names if n in self.services], self.services))
        if then:
            self.after_waves = then
        self.advance_waves()

    @batched
    def advance_waves(self):
        while self.waves:
            wave = [n for n in self.waves[0] if n in self.services]
            # A wave is signalled once, then waited on until none of it is STOPPING:
            # signalling again would stop a service that a restart has just started,
            # and a STARTING process must be stopped, not marked STOPPED while alive.
            if self.wave_begun is not self.waves[0]:
                self.wave_begun = self.waves[0]
                for name in wave:
                    if name in self.services:
                        self.feed(self.services[name], Stop("stopped"))
            if any(self.services[n].alive() and self.services[n].state == STOPPING
                   for n in wave if n in self.services):
                return
            self.waves.pop(0)
        if self.after_waves:
            then, self.after_waves = self.after_waves, None
            then()

    @batched
    def shutdown(self):
        if self.shutting_down:
            return
        # a trial check still running is pointless now, and must not outlive us
        for pid, purpose in list(self.helpers.items()):
            if purpose == "trial":
                kill_group_or_pid(pid, signal.SIGKILL, True)
        self.context.shutting_down = True
        self.events.notify("SUPERVISOR_STATE_CHANGE_STOPPING", "")
        if self.systemd:
            self.systemd.stopping()
        for svc in list(self.services.values()):
            self.feed(svc, Shutdown())
        self.waves = []
        self.stop_many(list(self.services), then=self.finish)

    def finish(self):
        if not any(s.alive() for s in self.services.values()):
            if ops_hold_exit(self, self.finish):
                return
            self.log("info", "every service is stopped; exiting")
            self.done = True

    def forget_service(self, svc):
        if self.services.get(svc.name) is not svc:
            return
        self.services.pop(svc.name, None)
        if self.state_file is not None:
            self.state_file.changed()
        self.events.detach(svc.name)
        self.close_notify(svc)
        self.do_cancel_probes(svc, None)
        for entry in self.live.pop(svc.name).timers.values():
            self.timers.cancel(entry)
        for stream in ("stdout", "stderr"):
            sink = self.sinks.pop((svc.name, stream), None)
            if sink:
                sink.close()

    # -- output -----------------------------------------------------------

    def add_pipe(self, pipe, nonblocking=False):
        if not nonblocking:
            os.set_blocking(pipe.fd, False)
        self.pipes[pipe.fd] = pipe
        self.pipes_of.setdefault(pipe.service, []).append(pipe)
        pipe.reader = self.pipe_reader
        self.selector.register(pipe.fd, selectors.EVENT_READ, pipe)

    def on_pipe(self, pipe):
        if pipe.splice:
            moved = self.splice_pipe(pipe)
            if moved is not None:
                return
        try:
            data = os.read(pipe.fd, READ_SIZE)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if data:
            self.carried(pipe, len(data))
            self.emit(pipe, data)
        else:
            self.close_pipe(pipe)

    def carried(self, pipe, n):
        if pipe.carried >= 0:
            # grown once the stream has carried 1 MiB: deterministic, unlike
            # waiting for a read that happens to find the pipe full
            pipe.carried += n
            if pipe.carried > 1 << 20:
                pipe.carried = -1
                if self.grown_pipes < GROWN_PIPES_MAX and grow_pipe(pipe.fd):
                    self.grown_pipes += 1
                    pipe.carried = -2

    def splice_pipe(self, pipe):
        """A stream going to its log file only (no `log -f` follower, no partial
        line held) moves by splice; bytes moved, or None: read it instead (near a
        rotation, where the cut needs the bytes; or splice refused)."""
        if pipe.partial or self.followers.get(pipe.service):
            return None
        svc = self.services.get(pipe.service)
        if svc is not None and svc.program.events is not None and pipe.stream == "stdout":
            pipe.splice = False               # a listener's stdout is the protocol: ours to parse
            return None
        sink = self.sink_for(pipe.service, pipe.stream)
        if sink is None:
            if self.services.get(pipe.service) is not None and \
                    self.services[pipe.service].program.stream_target(pipe.stream) == "prefix":
                pipe.splice = False           # prefixed: every line is ours to read
            return None
        if not sink.can_splice() or sink.room() < READ_SIZE or not sink.disk_has_room():
            return None
        try:
            moved = sink.splice_from(pipe.fd, READ_SIZE)
        except BlockingIOError:
            return 0
        except OSError as exc:
            if exc.errno not in (errno.ENOSPC, errno.EDQUOT, errno.EIO, errno.EFBIG):
                pipe.splice = False           # splice cannot serve this file at all
            return None                       # read: the Writer drops and counts
        if moved:
            self.carried(pipe, moved)
        else:
            self.close_pipe(pipe)
        return moved

    def drain_service_pipes(self, svc):
        """Read what a service wrote before it exited, so its last lines come first."""
        self.drain_pipes(list(self.pipes_of.get(svc.name, ())))

    def drain_pipes(self, pipes):
        """Read what is waiting in these pipes now.  Bounded: what a flooding writer
        adds meanwhile stays in the pipe for the next turn (or the next image)."""
        for pipe in pipes:
            for _ in range(64):
                try:
                    data = os.read(pipe.fd, READ_SIZE)
                except (BlockingIOError, OSError):
                    break
                if not data:
                    self.close_pipe(pipe)
                    break
                self.emit(pipe, data)

    def close_pipe(self, pipe):
        if pipe.partial:
            data, pipe.partial = pipe.partial + b"\n", b""
            self.emit(pipe, data, final=True)
        self.selector.unregister(pipe.fd)
        os.close(pipe.fd)
        self.pipes.pop(pipe.fd, None)
        mine = self.pipes_of.get(pipe.service)
        if mine is not None and pipe in mine:
            mine.remove(pipe)
            if not mine:
                del self.pipes_of[pipe.service]
        if pipe.held_pid is not None and self.state_file is not None:
            self.state_file.changed(pipe.service)    # no longer a pipe to take back
        if pipe.carried == -2:
            self.grown_pipes -= 1

    def sink_for(self, name, stream):
        """The LogFile of a stream with a *_logfile, or None for prefixed output."""
        svc = self.services.get(name)
        if svc is None:
            return None
        target = svc.program.stream_target(stream)
        if target in ("prefix", "none", "merged"):
            return None
        sink = self.sinks.get((name, stream))
        if sink is None:
            failed = self.unopened.get((name, stream))
            if failed is not None and monotonic() - failed < LogFile.REOPEN_EVERY:
                return None           # tried a moment ago: not an open() per read
            prog = svc.program
            path = target
            if target == "auto":
                path = os.path.join(self.config.settings["logdir"] or default_logdir(),
                                    "%s-%s.log" % (name, stream))
            try:
                sink = LogFile(path, getattr(prog, stream + "_logfile_maxbytes"),
                               getattr(prog, stream + "_logfile_backups"),
                               lambda level, message: self.log(level, message, name), self.timers)
            except OSError as exc:
                if failed is None:        # said once, not at every line
                    self.log("error", "cannot open %s: %s; writing to the supervisor's %s"
                             % (path, exc.strerror, stream), name)
                self.unopened[(name, stream)] = monotonic()
                return None
            if self.unopened.pop((name, stream), None) is not None:
                self.log("info", "writing to %s again" % path, name)
            self.sinks[(name, stream)] = sink
        return sink

    def emit(self, pipe, data, final=False):
        name, stream = pipe.service, pipe.stream
        if stream == "stdout" and self.events.listens(name):
            # a listener's stdout is the protocol, not output; logged only to a stdout_logfile
            self.events.output(name, data)
            sink = self.sink_for(name, stream)
            if sink is not None:
                sink.write(data)
            return
        sink = self.sink_for(name, stream)
        if sink is not None and not self.followers.get(name):
            if pipe.partial:
                data, pipe.partial = pipe.partial + data, b""
            self.count_dropped(name, sink.write(data))
            return
        if not final:
            data = pipe.partial + data
            cut = data.rfind(b"\n") + 1
            if cut == 0 and len(data) < MAX_PARTIAL:
                pipe.partial = data
                return
            if cut == 0:
                cut = len(data)
                data += b"\n"
                pipe.partial = b""
            else:
                pipe.partial = data[cut:]
                data = data[:cut]
        if sink is not None:
            self.count_dropped(name, sink.write(data))
        # data ends a line here.  Lines are split one by one only for a follower
        # or JSON logs (1 MiB of short lines is 10^4 of them); otherwise text that
        # is valid UTF-8 (as a rule, ASCII) is prefixed as bytes, in one replace,
        # and only the tail's last TAIL_LINES are decoded
        followers = self.followers.get(name)
        text = lines = None
        if followers or (sink is None and self.json_logs) or not utf8_clean(data):
            text = data.decode("utf-8", "replace")
            lines = text.split("\n")[:-1]
        live = self.live.get(name)
        if live is not None and sink is None:
            if live.tail is None:
                from collections import deque
                live.tail = deque(maxlen=TAIL_LINES)
            recent = lines if lines is not None else [
                part.decode("utf-8", "replace")
                for part in data.rsplit(b"\n", TAIL_LINES + 1)[:-1][-TAIL_LINES:]]
            live.tail.extend(recent)
            if stream == "stderr":
                if live.err_tail is None:
                    from collections import deque
                    live.err_tail = deque(maxlen=TAIL_LINES)
                live.err_tail.extend(recent)
        for client in followers or ():
            if client.log_stream in (None, stream):
                client.send_lines(lines)
        if sink is None:
            self.count_dropped(name, self.write_prefixed(name, stream, data, lines))

    def count_dropped(self, name, n):
        if n and name in self.services:
            self.services[name].dropped_bytes += n

    def write_prefixed(self, name, stream, data, lines):
        """data: whole lines, each ended by a newline; lines: the same decoded and
        split, or None where data is clean UTF-8 and goes out as it is."""
        fd = 2 if stream == "stderr" else 1
        if self.json_logs:
            now = round(time.time(), 3)
            out = "".join(json.dumps({"time": now, "service": name, "stream": stream,
                                      "message": line}) + "\n" for line in lines).encode()
        elif lines is None:
            prefix = (name + " | ").encode()
            out = prefix + data[:-1].replace(b"\n", b"\n" + prefix) + b"\n"
        else:
            prefix = name + " | "
            out = "".join(prefix + line + "\n" for line in lines).encode("utf-8", "replace")
        return self.stream(fd).write(out)

    # -- sd_notify --------------------------------------------------------------

    def notify_socket(self, svc):
        """The service's $NOTIFY_SOCKET: an abstract datagram socket of its own."""
        live = self.live[svc.name]
        if live.notify is None:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
            name = "respawn-%d-%s-%s" % (os.getpid(), svc.name, os.urandom(4).hex())
            sock.bind("\0" + name)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
            sock.setblocking(False)
            self.adopt_notify(svc, sock, "@" + name)
        return live.notify[1]

    def adopt_notify(self, svc, sock, address):
        self.live[svc.name].notify = (sock, address)
        self.selector.register(sock, selectors.EVENT_READ, lambda mask, s=svc: self.on_notify(s))

    def close_notify(self, svc):
        live = self.live.get(svc.name)
        if live is not None and live.notify is not None:
            self.selector.unregister(live.notify[0])
            live.notify[0].close()
            live.notify = None

    def on_notify(self, svc):
        sock = self.live[svc.name].notify[0]
        creds_size = struct.calcsize("3i")
        while True:
            try:
                data, anc, _, _ = sock.recvmsg(4096, socket.CMSG_SPACE(creds_size)
                                               + socket.CMSG_SPACE(16 * 4))
            except (BlockingIOError, InterruptedError):
                return
            sender = None
            for level, kind, payload in anc:
                if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                    # BARRIER=1 and FDSTORE: we keep no fds; closing answers the barrier
                    for fd in struct.unpack("%di" % (len(payload) // 4), payload[:len(payload) // 4 * 4]):
                        os.close(fd)
                elif level == socket.SOL_SOCKET and kind == getattr(socket, "SCM_CREDENTIALS", 2):
                    sender = struct.unpack("3i", payload[:creds_size])
            if not self.notify_allowed(svc, sender):
                self.log("warn", "ignored a notify message from pid %s outside the service"
                         % (sender[0] if sender else "?"), svc.name)
                continue
            self.feed(svc, NotifyMessage(parse_notify(data.decode("utf-8", "replace"))))
            if self.live.get(svc.name) is None or self.live[svc.name].notify is None:
                return            # closed by what the message caused (a reload, a forget)

    def notify_allowed(self, svc, sender):
        """Accept messages from the service's process group (systemd-notify runs as a
        child of a script), or, if the sender is already gone, from its user."""
        if sender is None or not svc.alive():
            return False
        pid, uid, _ = sender
        if pid == svc.pid:
            return True
        try:
            return os.getpgid(pid) == svc.pid
        except ProcessLookupError:
            allowed = {0, os.geteuid()}
            try:
                who = resolve_user(svc.program)
            except KeyError:
                who = None
            if who:
                allowed.add(who[0])
            return uid in allowed

    # -- reload -----------------------------------------------------------

    def reload(self, client=None):
        """Re-read the config and apply the difference; a bad config changes nothing."""
        if self.systemd:
            self.systemd.reloading()
        try:
            new = load_config(self.config.path)
        except ConfigErrors as exc:
            for e in exc.errors:
                self.log("error", "reload rejected: %s" % e)
            if self.systemd:
                self.systemd.reloaded(self.services, "%d errors" % len(exc.errors))
            if client:
                client.reply({"ok": False, "error": "config rejected", "errors": [str(e) for e in exc.errors]})
            return
        summary = self.apply_config(new)
        self.release_memory_soon()            # the old config, and the new one's parse
        set_process_title(self)
        ops_settings_changed(self)
        if self.systemd:
            self.systemd.reloaded(self.services)
        self.log("info", "reloaded %s: %s" % (new.path, ", ".join(
            "%s %s" % (k, ",".join(v)) for k, v in summary.items() if v) or "no change"))
        if client:
            client.reply({"ok": True, "changes": summary})

    @batched
    def apply_config(self, new):
        old = self.config
        summary = {"added": [], "removed": [], "restarted": [], "updated": [], "unchanged": []}
        self.config = new
        self.apply_settings()
        self.events.configure(new.programs)
        self.supervisord_env = is_supervisord_config(new)
        for name, svc in list(self.services.items()):
            if name not in new.programs:
                summary["removed"].append(name)
                self.feed(svc, Want(FORGET))
        for name, prog in new.programs.items():
            svc = self.services.get(name)
            if svc is None:
                summary["added"].append(name)
                self.add_service(prog)
                continue
            if svc.want == FORGET:
                # removed by an earlier reload and still stopping: back in the config,
                # so it is started again once its old process is gone
                summary["added"].append(name)
                self.feed(svc, ProgramChanged(prog, False))
                continue
            before = svc.program
            if before.raw == prog.raw:
                summary["unchanged"].append(name)
                svc.program = prog
                continue
            for stream in ("stdout", "stderr"):
                sink = self.sinks.pop((name, stream), None)
                if sink:
                    sink.close()        # reopened with the new path and limits
            restart = before.shape() != prog.shape() and svc.alive()
            summary["restarted" if restart else "updated"].append(name)
            if restart and prog.ready[0] != "notify":
                self.close_notify(svc)
            self.feed(svc, ProgramChanged(prog, restart))
        for name in summary["added"]:
            if self.services[name].want == UP:
                self.feed(self.services[name], Want(UP))
        self.start_waiting()
        # watch what the new config asks for (also when nothing was watched before)
        watched = lambda c: (c.settings["watch_self"], c.settings["watch_config"], sorted(c.files))
        if watched(old) != watched(new):
            self.setup_file_watch()
        return summary

    # -- the control socket: the snapshot, and requests (REQUESTS) -----------------

    def open_listener(self, path):
        make_private_dir(os.path.dirname(path))
        try:
            os.unlink(path)          # we hold the lock: whatever is there is stale
        except FileNotFoundError:
            pass
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old_umask = os.umask(0o177)
        try:
            sock.bind(path)
        finally:
            os.umask(old_umask)
        os.chmod(path, 0o600)
        sock.listen(128)
        self.adopt_listener(sock)

    def adopt_listener(self, sock):
        sock.setblocking(False)
        self.listener = sock
        self.selector.register(sock, selectors.EVENT_READ, self.on_accept)

    def on_accept(self, mask):
        for _ in range(64):
            try:
                conn, _ = self.listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except ConnectionAbortedError:
                continue                  # gone before we took it
            except OSError as exc:
                self.pause_accept(exc)
                return
            if self.accept_trouble is not None:
                self.accept_trouble = None
                self.log("info", "control socket: accepting connections again")
            busy = too_busy(conn.fileno(), len(self.clients))
            if busy:
                refuse(conn, busy)
                continue
            try:
                uid = peer_uid(conn)
            except OSError:
                uid = -1
            client = ControlClient(self, conn)
            if uid not in (0, os.geteuid()):
                client.refused = "permission denied: uid %d is neither root nor the supervisor's user" % uid

    def pause_accept(self, exc):
        """accept() failed (EMFILE, ENFILE, ENOBUFS): the listener stays readable and
        would spin the loop, so it leaves the selector until a client closes or a
        second has passed.  Said once per episode."""
        if self.accept_trouble is None:
            self.accept_trouble = exc.strerror or str(exc)
            self.log("warn", "control socket: cannot accept (%s); new connections wait"
                     % self.accept_trouble)
        if self.accept_paused is None and self.listener is not None:
            self.selector.unregister(self.listener)
            self.accept_paused = self.timers.at(monotonic() + 1.0, self.resume_accept)

    def resume_accept(self):
        if self.accept_paused is None:
            return
        self.timers.cancel(self.accept_paused)
        self.accept_paused = None
        if self.listener is not None:
            self.selector.register(self.listener, selectors.EVENT_READ, self.on_accept)

    def service_json(self, svc, now):
        up = svc.uptime(now) if svc.alive() else None
        return {"name": svc.name, "state": svc.state, "pid": svc.pid,
                "started": round(svc.started, 3) if svc.started else None,
                "uptime": round(up, 3) if up is not None else None,
                "restarts": svc.restarts, "exitstatus": svc.exitstatus,
                "reason": svc.reason or None, "ready": bool(svc.ready),
                "ok": should_be_running(svc), "wanted": svc.want == UP,
                "status": svc.status_text, "mainpid": svc.mainpid,
                "retry_in": round(svc.deadline - now, 3)
                if svc.state == BACKOFF and svc.deadline is not None else None,
                "failures": svc.failures, "waiting_for": svc.waiting_for,
                "dropped_bytes": svc.dropped_bytes,
                "adopted": self.live[svc.name].adopted}

    def status_json(self, names=None):
        """The snapshot of the supervisor and its services (status --json)."""
        now = monotonic()
        svcs = [self.services[n] for n in names] if names else \
            sorted(self.services.values(), key=lambda s: (s.program.priority, s.name))
        return {"supervisor": {"pid": os.getpid(), "version": __version__, "hash": self.hash,
                               "started": round(self.started, 3), "reexecs": self.reexecs,
                               "reexeced": round(self.reexeced, 3) if self.reexeced else None,
                               "config": self.config.path, "pidfds": self.watcher.uses_pidfds,
                               "dropped_bytes": self.log_dropped},
                "services": [self.service_json(s, now) for s in svcs]}

    def resolve_names(self, names, client):
        if not names:
            client.reply({"ok": False, "error": "name a service, or all"})
            return None
        if names == ["all"]:
            return sorted(self.services, key=lambda n: (self.services[n].program.priority, n))
        names, unknown = expand_names(self.config, names, self.services)
        if unknown:
            client.reply({"ok": False, "error": "no such service: %s" % ", ".join(unknown)})
            return None
        return names

    @batched
    def handle_request(self, client, req):
        cmd, args = req.get("cmd"), req.get("args") or {}
        if req.get("v", PROTOCOL) > PROTOCOL:
            self.log("debug", "client speaks protocol %s; answering as %d" % (req.get("v"), PROTOCOL))
        serve = REQUESTS.get(cmd) if isinstance(cmd, str) else None
        if serve is None:
            client.reply({"ok": False, "error": "unknown command %r" % cmd})
            return
        serve(self, client, args)

    def check_waiters(self):
        still = []
        for client, cmd, names in self.waiters:
            if client.sock is None:
                continue
            svcs = [self.services.get(n) for n in names]
            if all(s is None or self.settled(s, cmd) for s in svcs):
                results = {n: self.outcome(s, cmd) for n, s in zip(names, svcs) if s is not None}
                ok = all(r["ok"] for r in results.values())
                client.reply({"ok": ok, "results": results})
            else:
                still.append((client, cmd, names))
        self.waiters = still

    def settled(self, svc, cmd):
        if cmd == "stop":
            return not svc.alive() and svc.state != STOPPING
        if svc.then or svc.state in (STARTING, STOPPING):
            return False
        if svc.state == STOPPED and svc.waiting_for:
            blockers = [self.services[b] for b in start_blockers(svc, self.services)]
            return all(b.state in (FATAL, EXITED) or b.want != UP for b in blockers)
        return True

    def outcome(self, svc, cmd):
        if cmd == "stop":
            return {"ok": True, "state": svc.state}
        # a one-shot that ran and exited as expected did what it was asked to
        ok = svc.state == RUNNING or (svc.state == EXITED and should_be_running(svc))
        return {"ok": ok, "state": svc.state, "reason": None if ok else svc.reason}

    def close_control(self):
        for client in list(self.clients.values()):
            if client in self.shutdown_clients:
                client.send({"ok": True, "stopped": True})
            client.flush()
            client.close()
        if self.listener is not None:
            if self.accept_paused is None:
                self.selector.unregister(self.listener)
            self.timers.cancel(self.accept_paused)
            self.accept_paused = None
            self.listener.close()
            self.listener = None

    # -- re-execution: trigger, checks, exec, restore ---------------------------

    def setup_file_watch(self):
        if self.file_watch:
            self.file_watch.close()
            self.file_watch = None
        paths = []
        if self.config.settings["watch_self"]:
            paths.append(self.script)
        if self.config.settings["watch_config"]:
            paths.extend(self.config.files)
        if paths:
            self.file_watch = FileWatch(self, paths, self.on_files_changed)

    def on_files_changed(self, paths):
        if self.script in paths and self.config.settings["watch_self"]:
            self.request_reexec("file changed")
        if self.config.settings["watch_config"] and any(p in self.config.files for p in paths):
            try:
                texts = {p: _read_text(p) for p in self.config.files}
            except (OSError, UnicodeDecodeError):
                texts = None
            if texts != self.config.files:
                self.log("info", "the config changed on disk: reloading")
                self.reload()

    def request_reexec(self, why, client=None):
        if self.reexec_busy or self.shutting_down:
            if client:
                client.reply({"ok": False, "error": "a re-exec or shutdown is already in progress"})
            return
        if self.waves:
            # the stop waves still to run are not part of the handoff: finish them first
            if client:
                client.reply({"ok": False, "error": "a stop is in progress; try again when it is done"})
            else:
                self.log("info", "%s: re-exec postponed until the stop in progress is done" % why)
                self.timers.at(monotonic() + 1.0, self.request_reexec, why)
            return
        fail = lambda msg: self.reexec_refused(msg, None, client)
        try:
            with open(self.script, "rb") as f:
                code = f.read()
        except OSError as exc:
            return fail("cannot read %s: %s" % (self.script, exc.strerror))
        new_hash = sha256(code).hexdigest()
        # same bytes (a touch, a chmod): no new code, nothing to check or refuse
        if client is None and why == "file changed" and new_hash in (self.hash, self.rejected_hash):
            return
        if os.geteuid() == 0:
            problem = unsafe_path(self.script) or unsafe_path(sys.executable)
            if problem:
                return fail("refusing to re-execute as root: %s" % problem)
        running = self.source.code if self.source is not None and new_hash == self.hash else None
        try:
            self.reexec_code = (new_hash, running if running is not None and running.co_filename == self.script
                                else compile(code, self.script, "exec", dont_inherit=True), code)
        except (SyntaxError, ValueError) as exc:
            return self.reexec_refused("new code does not compile: %s (line %s)"
                                       % (getattr(exc, "msg", exc), getattr(exc, "lineno", "?")),
                                       new_hash, client)
        self.log("info", "%s: checking the new code (%s) before re-executing" % (why, new_hash[:12]))
        import tempfile
        # The trial reads the config as the new image will (the sections carried in
        # the state) and restores a snapshot of the real state in a dry run: a new
        # file that would fail after the exec fails here instead.
        try:
            out = tempfile.TemporaryFile()
            out.snapshot = snapshot = tempfile.NamedTemporaryFile(prefix="respawn-state-", suffix=".json")
            os.chmod(snapshot.name, 0o600)
            snapshot.write(dump_handoff(encode_handoff(self, [], new_hash, None), self.reexec_code[1]))
            snapshot.flush()
        except OSError as exc:      # a full or read-only temporary folder
            return fail("cannot write the trial's files in %s: %s" % (tempfile.gettempdir(), exc))
        self.reexec_busy = True
        self.reexec_client = client
        # the trial runs the code compiled above through the loader, as the exec
        # will: the file is not compiled a second time (~100 ms)
        code_fd = None
        try:
            argv, code_fd = loader_argv(self.reexec_code[1], code, [
                self.script, "--handoff-selftest", snapshot.name, "-c", self.config.path, "check", "--trial"])
            pid = spawn(Program("trial", {"command": tuple(argv)}, {}), out.fileno(), out.fileno(),
                        hold=(code_fd,))
        except (SpawnError, OSError) as exc:
            snapshot.close()
            out.close()
            self.reexec_busy = False
            return self.reexec_refused(str(exc) if isinstance(exc, SpawnError) else
                                       "cannot hand the new code to its trial: %s" % exc, None, client)
        finally:
            if code_fd is not None:
                os.close(code_fd)
        timer = self.timers.at(monotonic() + 30.0, kill_group_or_pid, pid, signal.SIGKILL, True)
        self.watch_helper(pid, "trial", lambda p, status: self.trial_done(p, status, out, timer, new_hash))

    def reexec_refused(self, message, bad_hash, client):
        self.log("error", "re-exec refused: %s; the running code keeps supervising" % message)
        self.reexec_code = None
        if bad_hash:
            self.rejected_hash = bad_hash
        if client:
            client.reply({"ok": False, "error": message})

    def trial_done(self, pid, status, out, timer, new_hash):
        self.timers.cancel(timer)
        self.reexec_busy = False
        client, self.reexec_client = self.reexec_client, None
        out.seek(0)
        text = out.read().decode("utf-8", "replace").strip().splitlines()
        out.snapshot.close()
        out.close()
        if self.shutting_down:        # a stop request came first: it wins (research F9)
            self.log("info", "re-exec abandoned: the supervisor is stopping")
            if client:
                client.reply({"ok": False, "error": "shutting down instead"})
            return
        if status != 0:
            why = text[-1] if text else describe_exit(status)
            return self.reexec_refused("the new code rejects the config or fails to start (%s): %s"
                                       % (describe_exit(status), why), new_hash, client)
        try:
            now_hash = file_hash(self.script)
        except OSError as exc:
            return self.reexec_refused("cannot read %s: %s" % (self.script, exc.strerror), None, client)
        if now_hash != new_hash:
            self.log("info", "the file changed again during the check; checking again")
            return self.request_reexec("file changed", client)
        if self.waves:
            # a stop began while the check ran: its waves are not handed over either
            return self.request_reexec("the checked code", client)
        self.exec_new_image(new_hash, client)

    def exec_new_image(self, new_hash, client):
        t0 = monotonic()
        handled = {getattr(signal, n) for n in HANDLED_SIGNALS}
        signal.pthread_sigmask(signal.SIG_BLOCK, handled)
        pending, self.signals_due = self.signals_due + self.drain_wakeup(), []
        if any(s in (signal.SIGTERM, signal.SIGINT, signal.SIGQUIT) for s in pending):
            signal.pthread_sigmask(signal.SIG_SETMASK, [])
            if client:
                client.reply({"ok": False, "error": "shutting down instead"})
            for s in pending:        # a stop request wins over the re-exec (research F9)
                self.on_signal(s)
            return
        gc.disable()                  # as in resume: the state is many objects, none garbage
        try:
            self.leap(new_hash, client, pending, t0)          # returns only by raising
        except Exception as exc:
            gc.enable()
            why = ("exec of %s failed: %s" % (sys.executable, exc) if getattr(exc, "in_execv", False)
                   else "the handoff failed: %s: %s" % (type(exc).__name__, exc))
            signal.pthread_sigmask(signal.SIG_SETMASK, [])
            self.reexec_refused(why, None, client)
            for s in pending:
                self.on_signal(s)

    def leap(self, new_hash, client, pending, t0):
        """Hand the state over and exec the new code.  If anything fails, every fd
        it opened is closed again and the exception says whether execv failed."""
        # what is waiting now, from the pipes that have something (one epoll_wait,
        # not a read per pipe); what comes later waits in the pipe for the new image
        ready = {key.fd for key, _ in self.selector.select(0)}
        self.drain_pipes([pipe for fd, pipe in self.pipes.items() if fd in ready])
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except (OSError, ValueError):
                pass
        for follower_list in self.followers.values():
            for follower in list(follower_list):
                follower.send({"event": "reexec"})
                follower.flush()
        # the last line of this image, before the state takes what waits in its writers
        self.log("info", "re-executing %s" % self.script)
        state = encode_handoff(self, pending, new_hash, client, t0)
        opened, kept = [], handoff_fds(state)
        released = self.selector.release(set(kept))
        if released is not None:
            state["fds"]["epoll"] = released[:2]
            kept.append(released[0])
        try:
            checked, self.reexec_code = self.reexec_code, None
            if checked is not None and checked[0] != new_hash:
                checked = None
            state_fd = memfd("respawn-state", dump_handoff(state, checked[1] if checked else None))
            opened.append(state_fd)
            rollback_fd = memfd("respawn-rollback", self.source.data() if self.source else b"")
            opened.append(rollback_fd)
            try:
                fcntl.fcntl(rollback_fd, getattr(fcntl, "F_ADD_SEALS", 1033), 0xF)
            except OSError:
                pass
            args = [self.script, "--handoff", str(state_fd), "--rollback", str(rollback_fd)] + self.argv
            if checked is not None:
                argv, code_fd = loader_argv(checked[1], checked[2], args)
                opened.append(code_fd)
            else:
                argv = [sys.executable] + interpreter_flags() + args
            for fd in [state_fd, rollback_fd] + kept:
                os.set_inheritable(fd, True)
            try:
                os.execv(sys.executable, argv)
            except OSError as exc:
                exc.in_execv = True
                raise
        except BaseException:
            for fd in kept:
                os.set_inheritable(fd, False)
            for fd in opened:
                os.close(fd)
            if released is not None:
                self.selector.restore_released(released[2])
            raise

    def restore_data(self, state):
        """The plain part of a handoff state (any format we read): what a trial
        run checks before the exec.  Returns the state decoded."""
        state = decode_handoff(state, self.config.programs, monotonic())
        self.started = state.get("started", self.started)
        self.reexecs = state.get("reexecs", 0) + 1
        self.reexeced = time.time()
        self.rejected_hash = state.get("rejected_hash")
        self.pidfile = state.get("pidfile")
        set_service_nofile(state.get("service_nofile"))
        if self.hash != state.get("new_hash"):
            # we are the previous code, rolled back to: the new file is bad
            self.rejected_hash = state.get("new_hash")
        for entry in state["services"]:
            svc = self.services.get(entry.get("name"))
            if svc is None and entry.get("want") == FORGET and entry.get("pid"):
                # removed by a reload and still stopping: not in the config any more,
                # but its process is ours to kill at stopwaitsecs and to reap
                raw = entry.get("program") or {}
                try:
                    values = {k: PROGRAM_KEYS[k][0](v) for k, v in raw.items() if k in PROGRAM_KEYS}
                except ValueError:
                    values = {}
                if "command" in values:
                    svc = self.add_service(Program(entry["name"], values, raw))
            if svc is None:
                continue
            for key in Service.CARRIED:
                if key in entry:
                    setattr(svc, key, entry[key])
            if entry.get("tail"):
                from collections import deque
                self.live[svc.name].tail = deque(entry["tail"], maxlen=TAIL_LINES)
            if entry.get("err_tail"):
                from collections import deque
                self.live[svc.name].err_tail = deque(entry["err_tail"], maxlen=TAIL_LINES)
            if entry.get("process"):
                live = self.live[svc.name]
                live.starttime, live.adopted, live.marker = entry["process"]
        return state

    @batched
    def restore(self, state):
        """The new image takes over: services, pipes, sockets, timers (one pass)."""
        import base64
        state = self.restore_data(state)
        self.take_output(state.get("output") or {})
        fds = state["fds"]
        self.watcher.inherit(fds.get("pidfds"))
        if fds.get("listener") is not None:
            self.adopt_listener(socket.socket(fileno=fds["listener"]))
        self.lock_fd = fds.get("lock")
        hooks = {h["pid"] for h in ((state.get("ops") or {}).get("hooks") or {}).get("running", ())}
        for pid in state.get("helpers", ()):
            if pid not in hooks:              # hooks go on (ops_start): their exits are told
                self.watcher.abandon(pid)     # probes and trials of the old image: reaped, quietly
        for name, (fd, address) in fds["notify"].items():
            if name in self.services:
                self.adopt_notify(self.services[name], socket.socket(fileno=fd), address)
            else:
                os.close(fd)
        for p in fds["pipes"]:
            partial = p.get("partial")
            # already non-blocking: the flag belongs to the pipe, not to our image
            self.add_pipe(Pipe(p["fd"], p["service"], p["stream"],
                               base64.b64decode(partial) if partial else b"",
                               tuple(p["held"]) if p.get("held") else None), nonblocking=True)
        self.events.take_over(state.get("events"))
        lost = []
        for svc in list(self.services.values()):
            for what, when in svc.deadlines():
                self.do_arm(svc, Arm(what, when))
            live = self.live[svc.name]
            if svc.pid is None:
                continue
            if live.adopted:              # not our child: watched through its pidfd again
                if not rewatch_adopted(self, svc):
                    lost.append(svc)
            elif not self.watcher.adopt(svc.pid, self.child_callback(svc)):
                lost.append(svc)
            elif live.starttime is None:  # handed over by 1.0.0, which did not keep it
                live.starttime = proc_start_time(svc.pid)
        for svc in lost:
            if self.live[svc.name].adopted:
                self.live[svc.name].adopted = False
                self.log("info", "adopted pid %d exited during the re-exec" % svc.pid, svc.name)
                self.feed(svc, Exited(None))
            else:
                self.log("error", "pid %d is no longer our child" % svc.pid, svc.name)
                self.feed(svc, Exited(None, "lost during re-exec"))
        return state

    @batched
    def resume_clients(self, state):
        """After the takeover: the control connections the old image handed over."""
        import base64
        fds = state["fds"]
        for entry in fds["clients"]:
            ControlClient(self, socket.socket(fileno=entry["fd"])).inbuf = base64.b64decode(entry["inbuf"])
        for entry in fds["waiters"]:
            client = ControlClient(self, socket.socket(fileno=entry["fd"]))
            client.closing = True             # its request was read by the old image
            self.timers.cancel(client.timer)
            client.timer = None
            self.waiters.append((client, entry["cmd"], entry["names"]))
        if self.waiters:
            self.check_waiters()


PERFORM = {
    Spawn: Supervisor.do_spawn, Signal: Supervisor.do_signal, Kill: Supervisor.do_kill,
    Arm: Supervisor.do_arm, StartProbe: Supervisor.do_start_probe,
    CancelProbes: Supervisor.do_cancel_probes, Log: Supervisor.do_log,
    StateChanged: Supervisor.do_state_changed, Forget: Supervisor.do_forget,
    ExitOnFatal: Supervisor.do_exit_on_fatal,
}
RespawnSupervisor = Supervisor        # the name of respawn 1.0.0


class Probe:
    """One readiness or health probe: a non-blocking TCP connect or a command,
    never blocking the loop; calls done(ok, why) once.  It reaches the loop only
    through `host` (call_at, cancel_timer, watch_fd, unwatch_fd, watch_helper,
    abandon_helper)."""

    def __init__(self, spec, program, timeout, done, host):
        self.spec, self.program, self.timeout, self.done_cb, self.host = spec, program, timeout, done, host
        self.sock = self.pid = self.timer = None
        self.finished = False

    def start(self):
        kind, arg = self.spec
        self.timer = self.host.call_at(monotonic() + self.timeout, self.finish, False,
                                       "no answer within %gs" % self.timeout)
        if kind == "tcp":
            host, port = arg
            try:
                family, socktype, proto, _, addr = socket.getaddrinfo(
                    host, port, 0, socket.SOCK_STREAM)[0]
                self.sock = socket.socket(family, socktype, proto)
                self.sock.setblocking(False)
                err = self.sock.connect_ex(addr)
            except OSError as exc:
                self.finish(False, "tcp %s:%d: %s" % (host, port, exc))
                return
            if err == 0:
                self.finish(True)
            elif err in (errno.EINPROGRESS, errno.EAGAIN):
                self.host.watch_fd(self.sock, selectors.EVENT_WRITE, self.on_connect)
            else:
                self.finish(False, "tcp %s:%d: %s" % (host, port, os.strerror(err)))
        else:
            prog = self.program
            probe_prog = Program(prog.name, dict(vars(prog), command=arg), prog.raw)
            import subprocess
            try:
                self.pid = spawn(probe_prog, subprocess.DEVNULL, subprocess.DEVNULL)
            except SpawnError as exc:
                self.finish(False, str(exc))
                return
            self.host.watch_helper(self.pid, "probe", self.on_exit)

    def on_connect(self, mask):
        err = self.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        host, port = self.spec[1]
        self.finish(err == 0, "tcp %s:%d: %s" % (host, port, os.strerror(err)))

    def on_exit(self, pid, status):
        self.pid = None
        self.finish(status == 0, "%s exited with %s" % (self.spec[1][0], describe_exit(status)))

    def cancel(self):
        if not self.finished:
            self.finished = True
            self.cleanup()

    def cleanup(self):
        self.host.cancel_timer(self.timer)
        if self.sock is not None:
            self.host.unwatch_fd(self.sock)
            self.sock.close()
            self.sock = None
        if self.pid is not None:
            # still ours to reap: the supervisor keeps it, with nobody listening
            kill_group_or_pid(self.pid, signal.SIGKILL, True)
            self.host.abandon_helper(self.pid)
            self.pid = None

    def finish(self, ok, why=None):
        if self.finished:
            return
        self.finished = True
        self.cleanup()
        self.done_cb(ok, why)


def _note_signal(signum, frame):
    """Every handled signal only writes its number to the wakeup fd (set_wakeup_fd)."""


# ---------------------------------------------------------------------------
# Control socket (server side): one JSON object per line, versioned
# ---------------------------------------------------------------------------

MAX_CLIENTS = 128                 # control connections at once; the next are refused
FD_RESERVE = 32                   # the last descriptors: for services, never for a client
MAX_LOG_LINES = 100000            # `log -n` at most


def _is_names(v):
    return isinstance(v, list) and all(isinstance(n, str) for n in v)


# What a request's args may hold: key -> (check, what it must be).  Every key a
# command reads is here, so that no handler meets a value of the wrong type;
# a null is a wrong type too (handlers read args.get(key, default)), but for names.
REQUEST_ARGS = {
    "names": (lambda v: v is None or _is_names(v), "a list of service names"),
    "name": (lambda v: isinstance(v, str), "a service name"),
    "n": (lambda v: type(v) is int and 0 <= v <= MAX_LOG_LINES,
          "a whole number from 0 to %d" % MAX_LOG_LINES),
    "signal": (lambda v: isinstance(v, str) and len(v) <= 32 or type(v) is int and 0 <= v < 1024,
               "a signal name or number"),
    "follow": (lambda v: isinstance(v, bool), "true or false"),
    "stream": (lambda v: v is None or v == "stderr", "\"stderr\" or null"),
    "lines": (lambda v: isinstance(v, bool), "true or false"),
}


def validate_request(req):
    """What is wrong with a decoded request, in one line, or None if nothing."""
    if not isinstance(req, dict):
        return "bad request: expected one JSON object"
    v = req.get("v", PROTOCOL)
    if type(v) is not int or not 1 <= v < 1 << 31:      # type(): true is not a version
        return "bad request: v must be a protocol version (a whole number from 1)"
    cmd = req.get("cmd")
    if not isinstance(cmd, str) or not 0 < len(cmd) <= 64:
        return "bad request: cmd must be a command name"
    args = req.get("args")
    if args is None:
        return None
    if not isinstance(args, dict):
        return "bad request: args must be an object"
    for key, (check, what) in REQUEST_ARGS.items():
        if key in args and not check(args[key]):
            return "bad request: %s must be %s" % (key, what)
    return None


def too_busy(fd, clients):
    """Why a new control connection is refused, or None."""
    if clients >= MAX_CLIENTS:
        return "too many control connections (%d); try again later" % MAX_CLIENTS
    import resource
    soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    if soft != resource.RLIM_INFINITY and fd >= soft - FD_RESERVE:
        return "the supervisor is short of file descriptors (limit %d); try again later" % soft
    return None


def refuse(conn, message):
    """Answer a connection we do not serve, at once, and close it: no state kept."""
    try:
        conn.setblocking(False)
        conn.send(json.dumps({"ok": False, "error": message}).encode() + b"\n")
        conn.recv(MAX_REQUEST)        # a request left unread would turn our close into a reset
    except OSError:
        pass
    conn.close()


class ControlClient:
    """One connection to the control socket.  Non-blocking both ways, a bounded
    request, a deadline for it: a slow or hostile client never stalls the loop."""

    def __init__(self, sup, sock):
        self.sup, self.sock = sup, sock
        self.inbuf, self.outbuf = b"", b""
        self.sent = 0                 # bytes of answers queued, for the memory they leave
        self.streaming = False
        self.closing = False
        self.refused = None           # the answer for a peer that is not served
        self.log_stream = None        # `log -f --stderr`: the one stream it follows
        self.fd = sock.fileno()
        sock.setblocking(False)
        sup.clients[self.fd] = self
        sup.selector.register(sock, selectors.EVENT_READ, self.on_event)
        self.timer = sup.timers.at(monotonic() + CLIENT_TIMEOUT, self.close)

    def on_event(self, mask):
        if mask & selectors.EVENT_WRITE:
            self.flush()
        if mask & selectors.EVENT_READ and self.sock is not None:
            try:
                data = self.sock.recv(65536)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                data = b""
            if not data:
                self.close()
                return
            if self.streaming or self.closing:
                return
            self.inbuf += data
            if b"\n" in self.inbuf:
                line = self.inbuf.split(b"\n", 1)[0]
                self.inbuf = b""
                self.sup.timers.cancel(self.timer)
                self.timer = None
                self.closing = True          # one request per connection
                if self.refused:
                    # answered once its request is read: closing on unread data would
                    # reset the connection and the client would never see why
                    self.reply({"ok": False, "error": self.refused})
                    return
                try:
                    request = json.loads(line.decode("utf-8"))
                except (ValueError, RecursionError):     # RecursionError: [[[[... nested deep
                    request = None
                error = validate_request(request)
                if error:
                    self.reply({"ok": False, "error": error})
                    return
                self.sup.handle_request(self, request)
            elif len(self.inbuf) > MAX_REQUEST:
                self.reply({"ok": False, "error": "request too large"})

    def send(self, obj):
        self.send_text(json.dumps(obj) + "\n")

    def send_text(self, text):
        """Lines of JSON already encoded (ASCII: json.dumps escapes the rest)."""
        if self.sock is None:
            return
        self.outbuf += text.encode()
        self.sent += len(text)
        if len(self.outbuf) > 16 * 1024 * 1024:       # a follower that never reads
            self.close()
            return
        self.flush()

    def reply(self, obj, keep_open=False, text=None):
        """Answer obj, or text: lines of JSON already encoded (serve_status)."""
        self.streaming = keep_open
        self.send(obj) if text is None else self.send_text(text)
        if not keep_open and self.sock is not None:
            self.closing = True
            if not self.outbuf:
                self.close()
            else:
                # a client that does not read its answer is not kept for ever
                self.sup.timers.cancel(self.timer)
                self.timer = self.sup.timers.at(monotonic() + CLIENT_TIMEOUT, self.close)

    def send_lines(self, lines):
        for line in lines:
            self.send({"line": line})

    def flush(self):
        if self.sock is None:
            return
        try:
            while self.outbuf:
                n = self.sock.send(self.outbuf)
                self.outbuf = self.outbuf[n:]
        except (BlockingIOError, InterruptedError):
            pass
        except OSError:
            self.close()
            return
        events = selectors.EVENT_READ | (selectors.EVENT_WRITE if self.outbuf else 0)
        self.sup.selector.modify(self.sock, events, self.on_event)
        if not self.outbuf and self.closing and not self.streaming:
            self.close()

    def close(self):
        if self.sock is None:
            return
        self.sup.timers.cancel(self.timer)
        self.sup.selector.unregister(self.sock)
        self.sup.clients.pop(self.fd, None)
        for followers in self.sup.followers.values():
            if self in followers:
                followers.remove(self)
        self.sock.close()
        self.sock = None
        self.outbuf = b""
        if self.sent > BIG_ANSWER:
            # the answer's garbage (a status of 5000 services: 5000 dicts, their
            # JSON, the buffer) stayed resident in glibc's heap: 7 MiB after one
            # `status`, 2.4 with the pages given back once the connection is done
            self.sup.release_memory_soon()
        if self.sup.accept_paused is not None:
            self.sup.resume_accept()          # a descriptor just freed


def peer_uid(sock):
    creds = sock.getsockopt(socket.SOL_SOCKET, getattr(socket, "SO_PEERCRED", 17),
                            struct.calcsize("3i"))
    return struct.unpack("3i", creds)[1]



# The supervisor's side of each command: one small function each, in REQUESTS.

def _names_or_refuse(sup, client, args):
    """The named services, or None once the client has been told why not."""
    names = sup.resolve_names(args.get("names") or [], client)
    if names is not None and sup.shutting_down:
        client.reply({"ok": False, "error": "the supervisor is shutting down"})
        return None
    return names


def by_priority(sup, names):
    return sorted(names, key=lambda n: (sup.services[n].program.priority, n))


def serve_status(sup, client, args):
    names = args.get("names") or []
    if names:
        names = sup.resolve_names(names, client)
        if names is None:
            return
    snap = sup.status_json(names)
    if not args.get("lines"):                 # a client older than 1.1.0: one object
        client.reply(dict(snap, ok=True))
        return
    # One line with the rest and the number of services, then one line per service:
    # the client prints each service's line as it is (cmd_status), decoding and
    # encoding none of them again, which was 30 ms of its 200 at 5000 services.
    services = snap.pop("services")
    head = dict(snap, ok=True, lines=len(services), all_ok=all(s["ok"] for s in services))
    client.reply(None, text="%s\n%s" % (json.dumps(head), json_lines(services)))


def json_lines(objects):
    """Each object's json.dumps on a line of its own, every one with "name" its first
    key.  One json.dumps of the list, its "}, {" cut into lines, costs half of one
    json.dumps call per object (12 against 20 ms for 5000 services): between the
    objects of the list the text is '}, {"name": ' and nowhere else, unless an
    object holds another whose first key is "name" (in a string a quote is \").
    The count says so, and such a list is encoded one object at a time."""
    if not objects:
        return ""
    text = json.dumps(objects)[1:-1]
    if text.count('}, {"name": ') != len(objects) - 1:
        return "".join([json.dumps(o) + "\n" for o in objects])
    return text.replace('}, {"name": ', '}\n{"name": ') + "\n"


def serve_start(sup, client, args):
    names = _names_or_refuse(sup, client, args)
    if names is None:
        return
    for n in by_priority(sup, names):
        sup.feed(sup.services[n], Want(UP, True))
    sup.waiters.append((client, "start", names))
    sup.check_waiters()


def serve_stop(sup, client, args):
    names = _names_or_refuse(sup, client, args)
    if names is None:
        return
    for n in names:
        sup.feed(sup.services[n], Want(DOWN))
    sup.stop_many(names)
    sup.waiters.append((client, "stop", names))
    sup.check_waiters()


def serve_restart(sup, client, args):
    names = _names_or_refuse(sup, client, args)
    if names is None:
        return
    alive = [n for n in names if sup.services[n].alive()]
    for n in names:
        sup.feed(sup.services[n], Want("restart"))
    sup.stop_many(alive)
    for n in names:
        if n in sup.services and not sup.services[n].alive():
            sup.feed(sup.services[n], Want(UP))
    sup.waiters.append((client, "restart", names))
    sup.check_waiters()


def serve_signal(sup, client, args):
    names = sup.resolve_names(args.get("names") or [], client)
    if names is None:
        return
    try:
        sig = signal_number(str(args.get("signal", "")))
    except ValueError:
        client.reply({"ok": False, "error": "unknown signal %r" % args.get("signal")})
        return
    sent = {}
    for n in names:
        svc = sup.services[n]
        sent[n] = bool(svc.alive() and kill_group_or_pid(svc.pid, sig, False))
    client.reply({"ok": all(sent.values()), "results": sent,
                  "error": None if all(sent.values()) else "not running: %s"
                  % ", ".join(n for n, ok in sent.items() if not ok)})


def serve_reload(sup, client, args):
    sup.reload(client)


def serve_reexec(sup, client, args):
    sup.request_reexec("reexec command", client)


def serve_log(sup, client, args):
    name = args.get("name")
    if not isinstance(name, str) or name not in sup.services:
        client.reply({"ok": False, "error": "no such service: %s" % name})
        return
    n = max(0, int(args.get("n", 20)))
    stream = "stderr" if args.get("stream") == "stderr" else None
    lines, error = log_tail(sup, sup.services[name], stream, n)
    if error:
        client.reply({"ok": False, "error": error})
        return
    follow = bool(args.get("follow"))
    client.log_stream = stream
    client.reply({"ok": True, "lines": lines, "stream": stream}, keep_open=follow)
    if follow:
        sup.followers.setdefault(name, []).append(client)


def serve_shutdown(sup, client, args):
    client.reply({"ok": True}, keep_open=True)
    sup.shutdown_clients.append(client)
    sup.shutdown()


def serve_metrics(sup, client, args):
    client.reply({"ok": True, "text": format_metrics(metrics_snapshot(sup))})


REQUESTS = {
    "status": serve_status, "start": serve_start, "stop": serve_stop, "restart": serve_restart,
    "signal": serve_signal, "reload": serve_reload, "reexec": serve_reexec, "log": serve_log,
    "shutdown": serve_shutdown, "metrics": serve_metrics,
}


# ---------------------------------------------------------------------------
# Operations: Prometheus metrics, on_change hooks, systemd and journald
# ---------------------------------------------------------------------------
# Each piece is a small object with a narrow interface: a `loop` (the
# Supervisor's call_at, cancel_timer, watch_fd, unwatch_fd, watch_helper), a log
# function, a snapshot or a command.  They hear of every change of state from
# one place, ops_state_changed, subscribed to Supervisor.on_state_change.

METRICS_MAX_CLIENTS = 16          # connections served at once; more are refused
METRICS_MAX_REQUEST = 8 * 1024    # an HTTP request head longer than this is refused
METRICS_DEADLINE = 10.0           # a scrape connection is closed after this, done or not
HOOK_MAX_RUNNING = 4              # on_change commands running at once
HOOK_MAX_QUEUED = 256             # changes waiting for a slot; beyond, the oldest is dropped
HOOK_TIMEOUT = 60.0               # a hook still running after this is killed
HOOK_MAX_OUTPUT = 64 * 1024       # bytes of one hook's output that are logged
STARTUP_STATUS_DELAY = 1.0        # STATUS= updates after READY=1, at most one per this
JOURNAL_PRIORITY = {"debug": 7, "info": 6, "warn": 4, "warning": 4, "error": 3, "critical": 2}


def ops_machine_problems(settings, config_path):
    """(key, message) for each [respawn] setting this machine cannot honour: for `check`."""
    command = settings.get("on_change")
    if command:
        exe = command[0]
        if "/" in exe:
            if not os.path.isfile(exe) or not os.access(exe, os.X_OK):
                yield "on_change", "on_change: command %r not found or not executable" % exe
        elif not which(exe, os.environ.get("PATH", os.defpath)):
            yield "on_change", "on_change: command %r not found in PATH" % exe
    pidfile = settings.get("pidfile")
    if pidfile:
        folder = os.path.dirname(os.path.abspath(pidfile))
        if not os.path.isdir(folder):
            yield "pidfile", "pidfile: folder %s does not exist (create it, or name another)" % _cut(folder)
    address = settings.get("metrics")
    if address:
        try:
            sock = metrics_listener(address)
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE and _supervisor_answers(settings, config_path):
                return        # most likely held by this config's own running supervisor
            yield "metrics", "metrics: cannot listen on %s: %s" % (
                format_address(address), exc.strerror or exc)
        else:
            sock.close()


def _supervisor_answers(settings, config_path):
    path = running_socket(config_path) or settings.get("socket") or default_socket(config_path)
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        try:
            s.connect(path)
            return True
        except OSError:
            return False


def format_address(address):
    host, port = address
    return ("[%s]:%d" if ":" in host else "%s:%d") % (host, port)


# -- metrics: the Prometheus text exposition format ---------------------------

def _label(value):
    return str(value).replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def metrics_snapshot(sup):
    """What format_metrics needs, from a supervisor: status --json's object (with
    the output dropped on a full disk), and per service whether its last health
    check passed."""
    snap = sup.status_json()
    for entry in snap["services"]:
        svc = sup.services[entry["name"]]
        entry["healthy"] = svc.state == RUNNING and not svc.health_failures
    return snap


def format_metrics(snapshot, up=True):
    """The Prometheus text exposition (format 0.0.4) of a status snapshot.
    up=False: only respawn_supervisor_up 0, for a textfile collector to see that
    nothing answered.  Labels are escaped once per service: a scrape of 5000
    services is a few tens of milliseconds of the loop."""
    out = []

    def value(v):
        return repr(float(v)) if isinstance(v, float) else str(int(v))

    def family(name, kind, text, samples):
        """samples: (label text without braces, value)."""
        out.append("# HELP %s %s\n# TYPE %s %s\n" % (name, text, name, kind))
        out.extend("%s{%s} %s\n" % (name, lab, value(v)) if lab else "%s %s\n" % (name, value(v))
                   for lab, v in samples)

    family("respawn_supervisor_up", "gauge", "1 if the supervisor answered.", [("", 1 if up else 0)])
    if not up:
        return "".join(out)
    sup, services = snapshot["supervisor"], snapshot["services"]
    family("respawn_build_info", "gauge", "The supervisor's version and Python, as labels.",
           [('version="%s",python="%d.%d.%d"' % ((_label(sup["version"]),) + sys.version_info[:3]), 1)])
    family("respawn_supervisor_start_time_seconds", "gauge",
           "When the supervisor started (Unix time; a re-exec keeps it).", [("", float(sup["started"]))])
    family("respawn_supervisor_reexecs_total", "counter",
           "Re-executions since the supervisor started.", [("", sup["reexecs"])])
    if sup.get("dropped_bytes") is not None:
        family("respawn_supervisor_log_dropped_bytes_total", "counter",
               "Bytes of the supervisor's own log that could not be written.", [("", sup["dropped_bytes"])])
    counts = dict.fromkeys((STOPPED, STARTING, RUNNING, BACKOFF, STOPPING, EXITED, FATAL), 0)
    for s in services:
        counts[s["state"]] = counts.get(s["state"], 0) + 1
    family("respawn_services", "gauge", "Services in each state.",
           [('state="%s"' % k, v) for k, v in counts.items()])
    labels = [('service="%s"' % _label(s["name"]), s) for s in services]
    per = lambda key: [(lab, key(s)) for lab, s in labels]
    family("respawn_service_up", "gauge", "1 if the service is RUNNING.",
           per(lambda s: s["state"] == RUNNING))
    family("respawn_service_state", "gauge", "1 for the state the service is in.",
           [('%s,state="%s"' % (lab, k), s["state"] == k) for lab, s in labels for k in counts])
    family("respawn_service_restarts_total", "counter",
           "Restarts of the service since the supervisor started.", per(lambda s: s["restarts"]))
    family("respawn_service_start_time_seconds", "gauge",
           "When the service's process was last started (Unix time).",
           [(lab, float(s["started"])) for lab, s in labels if s["started"]])
    family("respawn_service_ready", "gauge", "1 if the service passed its readiness check.",
           per(lambda s: bool(s["ready"])))
    family("respawn_service_healthy", "gauge",
           "1 if the service is RUNNING and its last health check (if any) passed.",
           per(lambda s: bool(s.get("healthy"))))
    family("respawn_service_ok", "gauge",
           "0 if the service should run and does not (what makes status exit 3).",
           per(lambda s: s.get("ok", True)))
    family("respawn_service_failed_starts", "gauge", "Failed starts in a row (FATAL past startretries).",
           per(lambda s: s.get("failures") or 0))
    if any("dropped_bytes" in s for s in services):
        family("respawn_output_dropped_bytes_total", "counter",
               "Bytes of the service's output that could not be written (a full disk...).",
               [(lab, s["dropped_bytes"]) for lab, s in labels if "dropped_bytes" in s])
    return "".join(out)


# -- metrics over HTTP ----------------------------------------------------------

def metrics_listener(address):
    """A bound, listening, non-blocking TCP socket for `metrics = HOST:PORT`; OSError."""
    host, port = address
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        # a supervisor restarted or re-executed must get its port back at once,
        # not after TIME_WAIT; SO_REUSEADDR never lets two listeners share it
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(64)
        sock.setblocking(False)
    except OSError:
        sock.close()
        raise
    return sock


class Scrape:
    """One connection to the metrics endpoint."""
    __slots__ = ("sock", "inbuf", "out", "timer", "writing")

    def __init__(self, sock):
        self.sock, self.inbuf, self.out, self.timer, self.writing = sock, b"", None, None, False


class MetricsServer:
    """GET /metrics and GET /healthz over HTTP/1.1, one request per connection.

    The sockets are non-blocking and live in the supervisor's own selector, not in
    a thread: a scrape reads the state between two events, never in the middle of
    one, with no lock.  A client costs a bounded buffer and a deadline; a slow or
    hostile one is cut, never waited for."""

    def __init__(self, address, loop, get_metrics, log):
        self.address, self.loop, self.get_metrics, self.log = address, loop, get_metrics, log
        self.sock = metrics_listener(address)
        self.conns = {}                   # fd -> Scrape
        self.paused = None
        self.loop.watch_fd(self.sock, selectors.EVENT_READ, self.on_accept)

    def on_accept(self, mask=None):
        for _ in range(64):
            try:
                conn, _ = self.sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                if exc.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                    # out of descriptors: the listener stays readable, so stop
                    # watching it for a second instead of spinning on it
                    self.log("warn", "metrics: accept: %s; pausing for 1s" % exc.strerror)
                    self.loop.unwatch_fd(self.sock)
                    self.paused = self.loop.call_at(monotonic() + 1.0, self.resume)
                return
            conn.setblocking(False)
            if len(self.conns) >= METRICS_MAX_CLIENTS:
                try:
                    conn.recv(METRICS_MAX_REQUEST)     # what came already: a close would reset it
                except OSError:
                    pass
                try:
                    conn.send(b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\n"
                              b"Connection: close\r\n\r\n")
                except OSError:
                    pass
                conn.close()
                continue
            c = Scrape(conn)
            c.timer = self.loop.call_at(monotonic() + METRICS_DEADLINE, self.close, c)
            self.conns[conn.fileno()] = c
            self.loop.watch_fd(conn, selectors.EVENT_READ, lambda m, c=c: self.on_event(c, m))

    def resume(self):
        self.paused = None
        if self.sock is not None:
            self.loop.watch_fd(self.sock, selectors.EVENT_READ, self.on_accept)

    def on_event(self, c, mask):
        sock = c.sock
        if c.out is None:
            try:
                data = sock.recv(4096)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                return self.close(c)
            if not data:
                return self.close(c)
            c.inbuf += data
            head = c.inbuf.replace(b"\r\n", b"\n")
            end = head.find(b"\n\n")
            if end < 0:
                if len(c.inbuf) > METRICS_MAX_REQUEST:
                    self.respond(c, 431, "Request Header Fields Too Large", b"request too large\n")
                return
            self.respond(c, *self.route(head[:end]))
        self.flush(c)

    def route(self, head):
        """(code, reason, body[, extra headers, head only]) for one request head."""
        parts = head.split(b"\n", 1)[0].split()
        if len(parts) != 3 or not parts[2].startswith(b"HTTP/"):
            return 400, "Bad Request", b"bad request\n"
        method, target = parts[0], parts[1].split(b"?", 1)[0]
        if target not in (b"/metrics", b"/healthz"):
            return 404, "Not Found", b"not found: try /metrics or /healthz\n"
        if method not in (b"GET", b"HEAD"):
            return 405, "Method Not Allowed", b"only GET\n", "Allow: GET, HEAD\r\n"
        if target == b"/healthz":
            body = b"ok\n"
        else:
            body = self.get_metrics().encode("utf-8")
        return 200, "OK", body, "", method == b"HEAD"

    def respond(self, c, code, reason, body, extra="", head_only=False):
        kind = "text/plain; version=0.0.4; charset=utf-8" if code == 200 else "text/plain; charset=utf-8"
        c.out = ("HTTP/1.1 %d %s\r\nContent-Type: %s\r\nContent-Length: %d\r\nConnection: close\r\n"
                "Cache-Control: no-store\r\n%s\r\n" % (code, reason, kind, len(body), extra)).encode() \
            + (b"" if head_only else body)
        c.out = memoryview(c.out)       # sent piece by piece with no copy of the rest
        c.inbuf = b""

    def flush(self, c):
        sock = c.sock
        while c.out:
            try:
                sent = sock.send(c.out[:1 << 20])
            except (BlockingIOError, InterruptedError):
                # the client reads slowly: wait until it can take more (its deadline still runs)
                if not c.writing:
                    c.writing = True
                    self.loop.unwatch_fd(sock)
                    self.loop.watch_fd(sock, selectors.EVENT_WRITE, lambda m, c=c: self.flush(c))
                return
            except OSError:
                return self.close(c)
            c.out = c.out[sent:]
        if c.out is not None:
            self.close(c)

    def close(self, c):
        sock = c.sock
        if sock.fileno() < 0:
            return
        self.loop.cancel_timer(c.timer)
        self.conns.pop(sock.fileno(), None)
        self.loop.unwatch_fd(sock)
        sock.close()

    def close_all(self):
        for c in list(self.conns.values()):
            self.close(c)
        self.loop.cancel_timer(self.paused)
        if self.sock is not None:
            self.loop.unwatch_fd(self.sock)
            self.sock.close()
            self.sock = None


# -- on_change hooks ------------------------------------------------------------

class Hook:
    """One on_change run: its change, its output pipe, its deadline."""
    __slots__ = ("env", "fd", "timer", "written", "partial", "until")

    def __init__(self, env, fd):
        self.env, self.fd, self.timer, self.written, self.partial = env, fd, None, 0, b""
        self.until = None             # when it is killed (HOOK_TIMEOUT after its start)

    def __str__(self):
        return "%s %s" % (self.env["RESPAWN_SERVICE"], self.env["RESPAWN_STATE"])


class HookRunner:
    """Runs `on_change = CMD` for each state change: a few at once, the rest
    queued in order (the oldest dropped past HOOK_MAX_QUEUED), output and failures
    logged.  A hook is run once per change, never retried: a failing hook must
    not turn into a loop of its own."""

    def __init__(self, command, loop, log):
        self.command, self.loop, self.log = command, loop, log
        self.queue = []
        self.running = {}                 # pid -> Hook
        self.dropped = 0
        self.on_idle = None

    def changed(self, service, state, previous, reason):
        env = {"RESPAWN_SERVICE": service, "RESPAWN_STATE": state,
               "RESPAWN_PREVIOUS": previous or "", "RESPAWN_REASON": reason or ""}
        self.queue.append(env)
        if len(self.queue) > HOOK_MAX_QUEUED:
            old = self.queue.pop(0)
            if not self.dropped:
                self.log("warn", "on_change: %d changes waiting for a hook; dropping the oldest "
                         "(%s: %s -> %s) and any more until the queue drains"
                         % (HOOK_MAX_QUEUED, old["RESPAWN_SERVICE"], old["RESPAWN_PREVIOUS"],
                            old["RESPAWN_STATE"]))
            self.dropped += 1
        self.run_queued()

    def busy(self):
        return bool(self.queue or self.running)

    def run_queued(self):
        while self.queue and len(self.running) < HOOK_MAX_RUNNING:
            self.run(self.queue.pop(0))
        if not self.queue and self.dropped:
            self.log("warn", "on_change: %d changes were dropped (too many at once)" % self.dropped)
            self.dropped = 0
        if not self.busy() and self.on_idle:
            then, self.on_idle = self.on_idle, None
            then()

    def run(self, env):
        what = "%s %s" % (env["RESPAWN_SERVICE"], env["RESPAWN_STATE"])
        if not self.command:
            return                # on_change was removed by a reload while this waited
        try:
            r, w = os.pipe()
        except OSError as exc:
            self.log("error", "on_change for %s not run: %s" % (what, exc.strerror))
            return
        try:
            pid = spawn(Program("on_change", {"command": self.command}, {}), w, w, env)
        except SpawnError as exc:
            os.close(r)
            self.log("error", "on_change for %s not run: %s" % (what, exc))
            return
        finally:
            os.close(w)
        os.set_blocking(r, False)
        hook = Hook(env, r)
        hook.until = monotonic() + HOOK_TIMEOUT
        self.watch(pid, hook)

    def watch(self, pid, hook):
        hook.timer = self.loop.call_at(hook.until, self.timeout, pid)
        self.running[pid] = hook
        if hook.fd is not None:
            self.loop.watch_fd(hook.fd, selectors.EVENT_READ, lambda m, pid=pid: self.read(pid))
        self.loop.watch_helper(pid, "on_change", self.exited)

    def handoff(self):
        """What a re-exec carries: the changes queued, in order, with their
        environment, and the hooks running (our children: the new image reads
        their output, kills them at their timeout and reaps them)."""
        import base64
        return {"queue": list(self.queue), "dropped": self.dropped,
                "running": [{"pid": pid, "fd": h.fd, "env": h.env, "written": h.written,
                             "partial": base64.b64encode(h.partial).decode(), "until": h.until}
                            for pid, h in self.running.items()]}

    @staticmethod
    def handoff_fds(carried):
        return [h["fd"] for h in (carried or {}).get("running", ()) if h.get("fd") is not None]

    def take_over(self, carried):
        """The new image: the hooks the old one ran go on, then the queue, in order."""
        import base64
        for entry in carried.get("running", ()):
            hook = Hook(entry["env"], entry.get("fd"))
            hook.written = entry.get("written", 0)
            hook.partial = base64.b64decode(entry.get("partial") or "")
            hook.until = entry.get("until") or monotonic() + HOOK_TIMEOUT
            self.watch(entry["pid"], hook)
        self.queue = list(carried.get("queue", ())) + self.queue
        self.dropped += carried.get("dropped", 0)
        self.run_queued()

    def read(self, pid, final=False):
        hook = self.running.get(pid)
        if hook is None or hook.fd is None:
            return
        eof = False
        while True:
            try:
                data = os.read(hook.fd, 65536)
            except BlockingIOError:
                break
            except OSError:
                data = b""
            if not data:
                eof = True
                break
            room = HOOK_MAX_OUTPUT - hook.written
            hook.written += len(data)
            if room > 0:
                lines = (hook.partial + data[:room]).split(b"\n")
                hook.partial = lines.pop()
                for line in lines:
                    self.log("info", "on_change (%s): %s" % (hook, line.decode("utf-8", "replace")))
            if not final:
                break             # one read per wake-up: a chatty hook does not hold the loop
        if eof or final:
            # a background child of the hook may hold the pipe open for ever: at the
            # hook's exit, what it wrote so far is logged and the pipe is closed
            if hook.partial:
                self.log("info", "on_change (%s): %s" % (hook, hook.partial.decode("utf-8", "replace")))
            if hook.written > HOOK_MAX_OUTPUT:
                self.log("warn", "on_change wrote %d bytes; only the first %d were logged"
                         % (hook.written, HOOK_MAX_OUTPUT))
            self.close_pipe(hook)

    def close_pipe(self, hook):
        if hook.fd is not None:
            self.loop.unwatch_fd(hook.fd)
            os.close(hook.fd)
            hook.fd = None

    def timeout(self, pid):
        if pid in self.running:
            self.log("warn", "on_change for %s still running after %gs: killed"
                     % (self.running[pid], HOOK_TIMEOUT))
            kill_group_or_pid(pid, signal.SIGKILL, True)

    def exited(self, pid, status):
        if pid not in self.running:
            return
        self.read(pid, final=True)
        hook = self.running.pop(pid)
        self.loop.cancel_timer(hook.timer)
        kill_group_or_pid(pid, signal.SIGKILL, True)      # nothing of the hook outlives it
        if status != 0:
            self.log("warn", "on_change for %s failed (%s); not retried" % (hook, describe_exit(status)))
        self.run_queued()

    def close(self):
        for hook in self.running.values():
            self.close_pipe(hook)
            self.loop.cancel_timer(hook.timer)


# -- systemd: sd_notify of the supervisor itself ----------------------------------

def _wanted(svc):
    return svc.want == UP


def _waiting(svc):
    """In STOPPED, waiting for what it requires."""
    return svc.state == STOPPED and not svc.alive() and bool(svc.waiting_for)


def startup_settled(services):
    """(settled, STATUS text): READY=1 waits until each autostart service is ready,
    or has failed (BACKOFF, FATAL, an unexpected exit, or waiting on one that did)."""
    running, failed, pending = [], [], []
    for s in sorted(services.values(), key=lambda s: (s.program.priority, s.name)):
        if not s.program.autostart or not _wanted(s):
            continue
        if s.state == RUNNING and s.ready or s.state == EXITED and should_be_running(s):
            running.append(s.name)
        elif s.state in (BACKOFF, FATAL, EXITED):
            failed.append("%s (%s)" % (s.name, s.state))
        elif _waiting(s):
            blockers = [services[b] for b in start_blockers(s, services)]
            if all(b.state in (BACKOFF, FATAL, EXITED) or not _wanted(b) for b in blockers):
                failed.append("%s (waiting for %s)" % (s.name, ", ".join(b.name for b in blockers)))
            else:
                pending.append(s.name)
        else:
            pending.append(s.name)
    text = "%d running" % len(running)
    if failed:
        text += "; failed: " + ", ".join(failed)
    if pending:
        text += "; starting: " + ", ".join(pending[:5]) + (" and %d more" % (len(pending) - 5)
                                                             if len(pending) > 5 else "")
    return not pending, text


class SystemdNotifier:
    """Our own messages to systemd ($NOTIFY_SOCKET of a Type=notify unit)."""

    def __init__(self, address, loop, watchdog_usec=None):
        self.address, self.loop = address, loop
        self.ready_sent = False
        self.check_timer = None
        self.last_status = None
        self.watchdog = watchdog_usec / 2e6 if watchdog_usec else None
        if self.watchdog:
            self.loop.call_at(monotonic(), self.ping)

    def send(self, *fields):
        notify_systemd("\n".join(fields), self.address)

    def ping(self):
        self.send("WATCHDOG=1")
        self.loop.call_at(monotonic() + self.watchdog, self.ping)

    def changed(self, services):
        """After a state change: READY=1 once settled, STATUS= when it says something
        new.  Checked once per turn of the loop before READY=1 (5000 services
        starting are one check, not 10000), at most once a second after it."""
        if self.check_timer is None:
            delay = STARTUP_STATUS_DELAY if self.ready_sent else 0.0
            self.check_timer = self.loop.call_at(monotonic() + delay, self.check, services)

    def check(self, services):
        self.check_timer = None
        settled, text = startup_settled(services)
        if not self.ready_sent and settled:
            self.ready_sent = True
            self.last_status = text
            self.send("READY=1", "STATUS=" + text, "MAINPID=%d" % os.getpid())
        elif text != self.last_status:
            self.last_status = text
            self.send("STATUS=" + text)

    def reloading(self):
        usec = int(time.clock_gettime(time.CLOCK_MONOTONIC) * 1e6)
        self.send("RELOADING=1", "STATUS=reloading the config", "MONOTONIC_USEC=%d" % usec)

    def reloaded(self, services, error=None):
        text = startup_settled(services)[1]
        self.last_status = None if error else text
        self.send("READY=1", "STATUS=" + ("reload rejected: %s; %s" % (error, text) if error else text))

    def stopping(self):
        self.send("STOPPING=1", "STATUS=stopping every service")


def journal_stream_is(fd):
    """True when fd is the journal's stream ($JOURNAL_STREAM = device:inode of it)."""
    try:
        dev, ino = os.environ.get("JOURNAL_STREAM", "").split(":")
        st = os.fstat(fd)
        return (st.st_dev, st.st_ino) == (int(dev), int(ino))
    except (ValueError, OSError):
        return False


# -- the supervisor's side: one entry per moment -------------------------------------

def ops_start(sup, carried=None):
    """Once the loop is set up (at `run`, and in a re-executed image): the metrics
    endpoint, the hooks and our own systemd notifications.  carried: what the
    previous image handed over (its systemd socket, whether READY=1 was sent)."""
    carried = carried or {}
    sup.daemon_log = carried.get("daemon_log") or sup.daemon_log
    sup.on_state_change.append(lambda svc, old, new: ops_state_changed(sup, svc, old, new))
    ops_settings_changed(sup)
    address = carried.get("notify") if carried else os.environ.pop("NOTIFY_SOCKET", None)
    # systemd's variables are ours, not our services' (sd_notify's unset_environment)
    usec, wpid = os.environ.pop("WATCHDOG_USEC", None), os.environ.pop("WATCHDOG_PID", None)
    if carried:
        usec, wpid = carried.get("watchdog_usec"), None
    hooks = carried.get("hooks")
    if hooks:
        if sup.hooks is None:         # on_change is gone: what runs is still ours to reap
            sup.hooks = HookRunner(sup.config.settings.get("on_change"), sup, sup.log)
        sup.hooks.take_over(hooks)
    sup.notify_parent = address
    if address:
        try:
            usec = int(usec) if usec and (not wpid or int(wpid) == os.getpid()) else None
        except ValueError:
            usec = None
        sup.systemd = SystemdNotifier(address, sup, usec)
        sup.systemd.ready_sent = bool(carried.get("ready_sent"))


def ops_handoff(sup):
    """What a re-exec carries for ops_start (the environment no longer has it)."""
    n = sup.systemd
    carried = {"notify": n.address, "ready_sent": n.ready_sent,
               "watchdog_usec": int(n.watchdog * 2e6) if n.watchdog else None} if n else {"notify": None}
    carried["daemon_log"] = sup.daemon_log
    if sup.hooks is not None:
        carried["hooks"] = sup.hooks.handoff()
    return carried


def ops_reopen(sup):
    """SIGUSR1 (logrotate's postrotate): a daemon's stdout and stderr move to the
    new log file too, not only the files opened by name."""
    if sup.daemon_log:
        try:
            redirect_output(sup.daemon_log)
        except OSError as exc:
            sup.log("error", "cannot reopen %s: %s; still writing to the old file"
                    % (sup.daemon_log, exc.strerror))


def ops_settings_changed(sup):
    """At start and after a reload: open, move or close the metrics endpoint; take
    the new on_change command."""
    s = sup.config.settings
    address = s.get("metrics")
    if sup.metrics is not None and sup.metrics.address != address:
        sup.metrics.close_all()
        sup.metrics = None
    if address and sup.metrics is None:
        try:
            sup.metrics = MetricsServer(address, sup,
                                        lambda: format_metrics(metrics_snapshot(sup)), sup.log)
            sup.log("info", "metrics on http://%s/metrics" % format_address(address))
        except OSError as exc:
            sup.log("error", "metrics: cannot listen on %s: %s; supervising without metrics"
                    % (format_address(address), exc.strerror or exc))
    command = s.get("on_change")
    if command and sup.hooks is None:
        sup.hooks = HookRunner(command, sup, sup.log)
    elif sup.hooks is not None:
        sup.hooks.command = command      # queued changes run with the new command
        if not command and not sup.hooks.busy():
            sup.hooks = None


def ops_state_changed(sup, svc, previous, state):
    """The one call site: every state change of a service passes here."""
    if sup.hooks is not None and sup.hooks.command:
        sup.hooks.changed(svc.name, state, previous, svc.reason)
    if sup.systemd is not None:
        sup.systemd.changed(sup.services)


def ops_hold_exit(sup, then):
    """At exit: wait (at most 5 s) for on_change hooks still running or queued,
    so that the last changes are told; True while waiting (then() is called again)."""
    hooks = sup.hooks
    if hooks is None or not hooks.busy():
        return False
    if sup.hooks_deadline is None:
        sup.hooks_deadline = monotonic() + 5.0
        sup.call_at(sup.hooks_deadline, then)
    if monotonic() >= sup.hooks_deadline:
        sup.log("warn", "on_change: %d hooks still running and %d queued at exit; left behind"
                % (len(hooks.running), len(hooks.queue)))
        return False
    hooks.on_idle = then
    return True


def ops_close(sup):
    if sup.metrics is not None:
        sup.metrics.close_all()
        sup.metrics = None
    if sup.hooks is not None:
        sup.hooks.close()


# ---------------------------------------------------------------------------
# Re-execution: watch our own file, the loader, the handoff codec
# ---------------------------------------------------------------------------

def unsafe_path(path):
    """Why a file (and every folder above it) could be written by someone other than
    root or us, or None.  Only asked when running as root (SPEC, research F18)."""
    allowed = {0, os.geteuid()}
    path = os.path.realpath(path)
    while True:
        try:
            st = os.lstat(path)
        except OSError as exc:
            return "%s: %s" % (path, exc.strerror)
        if st.st_uid not in allowed:
            return "%s is owned by uid %d" % (path, st.st_uid)
        # in a sticky folder (/tmp) only the owner may replace a file, and the
        # file's owner is checked above
        sticky_ok = stat.S_ISDIR(st.st_mode) and st.st_mode & stat.S_ISVTX
        if st.st_mode & 0o022 and not sticky_ok:
            return "%s is writable by %s (mode %o)" % (
                path, "group" if st.st_mode & 0o020 else "others", stat.S_IMODE(st.st_mode))
        if path == "/":
            return None
        path = os.path.dirname(path)


class FileWatch:
    """Tells when one of some files may have changed.  inotify costs nothing at
    idle; without it, a stat once a second.  Debounced: a file still being
    written waits until it holds still."""

    IN_MODIFY, IN_ATTRIB, IN_CLOSE_WRITE, IN_MOVED_TO, IN_CREATE = 0x2, 0x4, 0x8, 0x80, 0x100

    def __init__(self, sup, paths, callback):
        self.sup, self.callback = sup, callback
        self.paths = [os.path.abspath(p) for p in paths]
        self.fd = None
        self.wds = {}             # wd -> folder (names created in it) or path (its writes)
        self.timer = None
        self.stats = {p: self.stat(p) for p in self.paths}
        self.seen = {}            # the stat poll's previous look (no inotify)
        if os.environ.get("RESPAWN_NO_INOTIFY") != "1":
            self.fd = self.inotify()
        if self.fd is None:
            self.timer = sup.call_at(monotonic() + 1.0, self.poll)

    def inotify(self):
        # The folder is watched only for names created or renamed into it (a file
        # replaced by rename), and each file for writes to it: writes to other
        # files in the folder (a log beside the script) never wake us.
        try:
            import ctypes
            self.libc = ctypes.CDLL(None, use_errno=True)
            fd = self.libc.inotify_init1(os.O_NONBLOCK | os.O_CLOEXEC)
            if fd < 0:
                return None
            for folder in sorted({os.path.dirname(p) for p in self.paths}):
                wd = self.libc.inotify_add_watch(fd, folder.encode(), self.IN_MOVED_TO | self.IN_CREATE)
                if wd >= 0:
                    self.wds[wd] = folder
            if not self.wds:
                os.close(fd)
                return None
        except (OSError, AttributeError, ImportError):
            return None
        self.fd = fd
        self.watch_files()
        self.sup.watch_fd(fd, selectors.EVENT_READ, self.on_inotify)
        return fd

    def watch_files(self):
        """(Re)watch each file: after a rename over it, its path is a new inode."""
        for path in self.paths:
            wd = self.libc.inotify_add_watch(self.fd, path.encode(),
                                             self.IN_MODIFY | self.IN_CLOSE_WRITE | self.IN_ATTRIB)
            if wd >= 0:
                self.wds[wd] = path

    def on_inotify(self, mask):
        try:
            data = os.read(self.fd, 65536)
        except BlockingIOError:
            return
        offset, hit = 0, False
        while offset + 16 <= len(data):
            wd, _, _, length = struct.unpack_from("iIII", data, offset)
            name = data[offset + 16:offset + 16 + length].rstrip(b"\0").decode("utf-8", "replace")
            offset += 16 + length
            watched = self.wds.get(wd, "")
            # an event on a watched file has no name; one in a folder names the entry
            if (os.path.join(watched, name) if name else watched) in self.paths:
                hit = True
        if hit:
            self.sup.cancel_timer(self.timer)
            self.timer = self.sup.call_at(monotonic() + 0.3, self.settle)

    def settle(self):
        self.timer = None
        if self.fd is not None:
            self.watch_files()
        changed = [p for p in self.paths if self.stat(p) != self.stats.get(p)]
        for p in self.paths:
            self.stats[p] = self.stat(p)
        if changed:
            self.callback(changed)

    def poll(self):
        # without inotify: a change must hold still for a whole poll before we act
        now = [(p, self.stat(p)) for p in self.paths]
        settled = [p for p, st in now if st != self.stats.get(p) and st == self.seen.get(p)]
        self.seen = dict(now)
        for p in settled:
            self.stats[p] = self.seen[p]
        # armed before the callback: a reload in it may close this watch, and
        # close() must be able to cancel the next poll
        self.timer = self.sup.call_at(monotonic() + 1.0, self.poll)
        if settled:
            self.callback(settled)

    @staticmethod
    def stat(path):
        try:
            st = os.stat(path)
            return (st.st_ino, st.st_size, st.st_mtime_ns, st.st_mode)
        except OSError:
            return None

    def close(self):
        self.sup.cancel_timer(self.timer)
        if self.fd is not None:
            self.sup.unwatch_fd(self.fd)
            os.close(self.fd)
            self.fd = None


class Packed:
    """Bytes kept for a rare use, zlib-compressed where zlib exists (it is optional).
    code: for the running code's source, the code object compiled from exactly
    these bytes (the loader's), or None."""

    __slots__ = ("packed", "raw", "code")

    def __init__(self, data, code=None, now=True):
        self.code = code
        self.packed, self.raw = None, data
        if now:
            self.pack()

    def pack(self):
        """A handoff packs once the loop turns: 13 ms of zlib off the handoff."""
        try:
            import zlib
        except ImportError:
            return
        if self.raw is not None:
            self.packed, self.raw = zlib.compress(self.raw), None

    def data(self):
        if self.packed is None:
            return self.raw
        import zlib
        return zlib.decompress(self.packed)


def memfd(name, data):
    """A memory-only file holding data, rewound: the handoff channel (research F14)."""
    try:
        fd = os.memfd_create(name, os.MFD_CLOEXEC | getattr(os, "MFD_ALLOW_SEALING", 0))
    except (AttributeError, OSError):
        import tempfile
        with tempfile.TemporaryFile() as f:       # unlinked already: nobody can open it
            fd = os.dup(f.fileno())
    write_all(fd, data)
    os.lseek(fd, 0, os.SEEK_SET)
    return fd


# The handoff state is JSON, which any release reads (1.0.0 wrote format 1), or,
# for new code that reads it, marshal data (plain values only, version 4,
# after this prefix): at 5000 services (2.6 MB) it is written and read in 17 ms
# of CPU instead of 53.  New code reads it when its module names
# HANDOFF_MARSHAL (the old image looks in the code it compiled for the trial;
# a state that marshal cannot write, an enum in it, goes as JSON): an older
# release, a downgrade, still gets JSON, and the trial reads what the leap
# will hand over, so a mistake here is a refused re-exec, not a failed one.
HANDOFF_MARSHAL = b"respawn-handoff-marshal\n"


def dump_handoff(state, code):
    """The bytes of a handoff state for the new code compiled as `code` (None:
    unknown code, JSON)."""
    if code is not None and "HANDOFF_MARSHAL" in code.co_names:
        import marshal
        try:
            return HANDOFF_MARSHAL + marshal.dumps(state, 4)
        except ValueError:            # an object marshal does not write: JSON does
            pass
    return json.dumps(state, check_circular=False, separators=(",", ":")).encode()


def load_handoff(data):
    """A handoff state from its bytes (dump_handoff's, or any release's JSON)."""
    if data.startswith(HANDOFF_MARSHAL):
        import marshal
        return marshal.loads(memoryview(data)[len(HANDOFF_MARSHAL):])
    return json.loads(data.decode())


# CPython keeps the syntax tree of a __main__ script until the script's body
# returns: for this file ~7 MiB, held for the supervisor's whole life, and a
# __main__ script is parsed at every start (it has no .pyc).  So a supervisor
# runs from a code object compiled beforehand, handed over in a memfd (with
# the source it came from) to this one-line loader: `python -I -c LOADER FD
# SCRIPT ARGS...`.  The re-exec hands over the new file compiled by its own
# check, so the handoff does not parse 3400 lines either.
#
# The memfd holds: 4 bytes of source length, the source, then the bytecode
# magic number and the marshalled code.  The code is used only when the magic
# matches the interpreter that runs the loader: when sys.executable has become
# another Python version (a distribution upgrade), marshal data from the old one
# could not load, so the loader compiles the source instead.
LOADER = ("import marshal,os,sys;from _frozen_importlib_external import MAGIC_NUMBER as m;f=int(sys.argv[1]);"
          "d=os.pread(f,os.fstat(f).st_size,0);os.close(f);del sys.argv[:2];"
          "n=int.from_bytes(d[:4],'big');s=d[4:4+n];k=d[4+n:];del d;"
          "c=marshal.loads(k[len(m):]) if k[:len(m)]==m else compile(s,sys.argv[0],'exec');del k;"
          "g={'__name__':'__main__','__file__':sys.argv[0],'__builtins__':__builtins__,"
          "'_LOADED_SOURCE':s};del s;exec(c,g)")


def loader_argv(code, source, args):
    """The command line that runs `code` (compiled from `source`) as __main__
    with args, and the inheritable memfd it reads."""
    import marshal
    from importlib.util import MAGIC_NUMBER
    fd = memfd("respawn-code", len(source).to_bytes(4, "big") + source + MAGIC_NUMBER
               + marshal.dumps(code))
    os.set_inheritable(fd, True)
    return [sys.executable] + interpreter_flags() + ["-c", LOADER, str(fd)] + args, fd


def interpreter_flags():
    """The interpreter options we were started with, for the exec; always -I."""
    flags = []
    orig = getattr(sys, "orig_argv", None)
    if orig and len(orig) > len(sys.argv):
        flags = [f for f in orig[1:len(orig) - len(sys.argv)] if f not in ("-m",)]
        if "-c" in flags:
            at = flags.index("-c")      # our own loader: the options before it are the user's
            # (a loader of an older version too: the line starts the same way)
            flags = flags[:at] if flags[at + 1:at + 2] and flags[at + 1].startswith(LOADER[:22]) else []
    # -S: no site module.  The supervisor needs nothing from site-packages, and
    # site's .pth files would cost start-up time (part of every handoff) and memory.
    for flag in ("-S", "-I"):
        if flag not in flags:
            flags.insert(0, flag)
    return flags


def handoff_fds(state):
    """Every fd a handoff state names: the old image keeps them across the exec,
    the new one claims them.  Format 2 lists them in one table; format 1 had
    them in its parts (missing keys are fine: a state from an older release)."""
    if state.get("format", 1) >= 2:
        fds = state.get("fds") or {}
        out = [fds.get(k) for k in ("listener", "lock", "client") if fds.get(k) is not None]
        out += [p["fd"] for p in fds.get("pipes", ())]
        out += [n[0] for n in (fds.get("notify") or {}).values()]
        out += [c["fd"] for c in fds.get("clients", ())] + [w["fd"] for w in fds.get("waiters", ())]
        out += [fd for _, fd in fds.get("pidfds", ())]
        out += [fds["epoll"][0]] if fds.get("epoll") else []
        out += EventHub.handoff_fds(state.get("events"))
        out += HookRunner.handoff_fds((state.get("ops") or {}).get("hooks"))
        return out
    fds = [p["fd"] for p in state.get("pipes", ())]
    fds += [s["notify"][0] for s in state.get("services", ()) if s.get("notify")]
    fds += [state.get(k) for k in ("listener", "lock", "client") if state.get(k) is not None]
    fds += [c["fd"] for c in state.get("clients", ())]
    fds += [w["fd"] for w in state.get("waiters", ())]
    return fds


def encode_handoff(sup, pending, new_hash, client, t0=None):
    """The state a re-exec hands over (format 2): each service's record (CARRIED,
    only what differs from a new one: smaller is sooner), and one table of the
    fds the new image takes over.  t0: when supervision paused for the handoff."""
    import base64
    services = []
    # a new record differs by program only in `want` (autostart): one of each, not
    # one per service (5000 services: ~30 ms)
    fresh_of = {}
    for svc in sup.services.values():
        fresh = fresh_of.get(svc.program.autostart)
        if fresh is None:
            fresh = fresh_of[svc.program.autostart] = Service(svc.program)
        entry = {k: getattr(svc, k) for k in Service.CARRIED if getattr(svc, k) != getattr(fresh, k)}
        entry["name"] = svc.name
        live = sup.live[svc.name]
        if live.tail:
            entry["tail"] = list(live.tail)
        if live.err_tail:
            entry["err_tail"] = list(live.err_tail)
        if live.starttime is not None:
            entry["process"] = [live.starttime, live.adopted, live.marker]
        if svc.want == FORGET:
            # the new image types programs from the config text; a removed one,
            # still stopping, is in no config any more
            entry["program"] = dict(svc.program.raw)
        services.append(entry)
    fds = {
        "listener": sup.listener.fileno() if sup.listener else None,
        "lock": sup.lock_fd,
        # the client that asked for this re-exec: answered by the new image
        "client": client.sock.fileno() if client and client.sock else None,
        # accepted, request not read in full yet: the new image answers them (risk 15)
        "clients": [{"fd": c.sock.fileno(), "inbuf": base64.b64encode(c.inbuf).decode()}
                    for c in sup.clients.values()
                    if c.sock is not None and not c.closing and not c.streaming],
        # start/restart requests waiting for their services to settle
        "waiters": [{"fd": c.sock.fileno(), "cmd": cmd, "names": names}
                    for c, cmd, names in sup.waiters if c.sock is not None],
        "pipes": [dict({"fd": p.fd, "service": p.service, "stream": p.stream},
                       **({"partial": base64.b64encode(p.partial).decode()} if p.partial else {}),
                       **({"held": [p.held_pid, p.held_fd]} if p.held_pid is not None else {}))
                  for p in sup.pipes.values()],
        "notify": {name: [live.notify[0].fileno(), live.notify[1]]
                   for name, live in sup.live.items() if live.notify is not None},
        # the pidfds of our children (services, hooks, helpers): the new image
        # watches them as they are (an older one closes them as strays)
        "pidfds": [[pid, fd] for pid, fd in getattr(sup.watcher, "pidfds", {}).items()],
    }
    return {
        "format": HANDOFF_FORMAT, "version": __version__, "hash": sup.hash,
        "new_hash": new_hash, "t0": monotonic() if t0 is None else t0, "started": sup.started,
        "reexecs": sup.reexecs, "rejected_hash": sup.rejected_hash,
        # a key of its own (format 1 had config_path...): an older image's trial
        # finds no config_files and refuses the state, so a downgrade is refused
        # while this image still supervises, not after the exec
        "config": {"path": sup.config.path, "files": sup.config.files,
                   "sections": {"format": SECTIONS_FORMAT, "sections": sup.config.sections}},
        "pending": list(pending), "script": sup.script, "argv": sup.argv,
        "pidfile": sup.pidfile,
        # the soft RLIMIT_NOFILE our services get (raise_nofile)
        "service_nofile": SERVICE_NOFILE,
        "ops": ops_handoff(sup),
        "helpers": sorted(set(sup.helpers) | sup.watcher.abandoned),
        "services": services,
        "fds": fds,
        "events": sup.events.handoff(),
        # what waits for a slow reader of our outputs: written by the new image first
        "output": sup.carry_output(),
    }


def handoff_config(state):
    """(path, files, carried sections or None) of a handoff state of any format."""
    if state.get("format", 1) >= 2:
        config = state["config"]
        return config["path"], config["files"], config.get("sections")
    return state["config_path"], state["config_files"], state.get("config_sections")


def handoff_load_config(state):
    """The config a handoff state carries, as the new image reads it (and so its
    trial): the sections as they were read when their form is ours, else the
    files' text parsed again."""
    path, files, carried = handoff_config(state)
    carried = carried or {}
    return load_config(path, read=lambda p: files[p] if p in files else _read_text(p),
                       carried={"files": files, "sections": carried["sections"]}
                       if carried.get("format") in (2, SECTIONS_FORMAT) else None)


def decode_handoff(state, programs, now):
    """A handoff state of any format we read, as format 2.  Format 1 (respawn
    1.0.0) kept fds beside what they belong to, and meanings in flags and timer
    callbacks: both are made explicit here, so restore knows one format."""
    fmt = state.get("format", 1)
    if fmt > HANDOFF_FORMAT:
        raise ValueError("state format %s is newer than this code" % fmt)
    if fmt >= 2:
        return state
    state = dict(state)
    services = []
    notify = {}
    for entry in state.get("services", ()):
        name = entry.get("name")
        prog = programs.get(name)
        if prog is None and entry.get("removed"):
            raw = entry.get("program") or {}
            try:
                prog = Program(name, {k: PROGRAM_KEYS[k][0](v) for k, v in raw.items()
                                      if k in PROGRAM_KEYS}, raw)
            except ValueError:
                prog = None
        if entry.get("notify"):
            notify[name] = entry["notify"]
        if prog is None:
            continue
        new = record_from_format1(entry, prog, now)
        new["name"] = name
        for key in ("tail", "program"):
            if key in entry:
                new[key] = entry[key]
        services.append(new)
    state["services"] = services
    state["fds"] = {
        "listener": state.pop("listener", None), "lock": state.pop("lock", None),
        "client": state.pop("client", None), "clients": state.pop("clients", []),
        "waiters": state.pop("waiters", []), "pipes": state.pop("pipes", []), "notify": notify,
    }
    state["format"] = HANDOFF_FORMAT
    return state



# ---------------------------------------------------------------------------
# Identity, state file and adoption: one supervisor per config, and services
# that outlive a killed supervisor and are taken over by the next one
# ---------------------------------------------------------------------------
#
# Identity is the config file's resolved path (symlinks resolved).  Its lock
# and its state file live in one folder per user that no environment variable
# moves (identity_dir): $XDG_RUNTIME_DIR is set by a login and not by cron or
# systemd, so a lock under it would let two supervisors run one config.  The
# lock is an flock, which dies with its holder: a crash never leaves a lock
# that blocks the next start.  The lock file also says where its holder
# listens, so clients find it whatever their environment or an unreloaded
# edit of `socket =` says.
#
# Each service holds a copy of its own output pipes' read ends (at the fd
# number they have in the supervisor, at least HELD_FD_FLOOR): while it lives
# its pipes always have a reader, so it never gets SIGPIPE because the
# supervisor died, and its output waits in the pipe.  The next supervisor
# takes the read ends back with pidfd_getfd (research: adoption.md).

STATE_FORMAT = 1                  # state file format version
HELD_FD_FLOOR = 10                # shells name fds 0-9 (`exec 9>lock`): held read ends stay above
SERVICE_MARKER = "RESPAWN_SERVICE"   # in each service's environment: CONFIGID/NAME
ADOPTED_POLL = 1.0                # seconds between checks of an adopted process, without pidfds
SYS_PIDFD_OPEN, SYS_PIDFD_GETFD = 434, 438   # the same on every architecture of the unified table
UNIFIED_SYSCALLS = ("x86_64", "aarch64", "i386", "i686", "armv7l", "armv6l", "riscv64",
                    "ppc64le", "ppc64", "s390x", "loongarch64")


class AlreadyRunning(Exception):
    pass


def default_runtime_dir():
    if os.environ.get("XDG_RUNTIME_DIR"):
        return os.path.join(os.environ["XDG_RUNTIME_DIR"], "respawn")
    return identity_dir()


def identity_dir():
    """Where locks and state files live: one folder per user, the same in every
    environment (login, cron, systemd, sudo)."""
    return "/run/respawn" if os.geteuid() == 0 else "/tmp/respawn-%d" % os.geteuid()


def config_identity(config_path):
    """(name, digest): the config's file name without .ini, and the SHA-256 of its
    resolved path: the same file reached by any path is the same config."""
    real = os.path.realpath(config_path)
    name = os.path.basename(real)
    if name.endswith(".ini"):
        name = name[:-4]
    return name, sha256(os.fsencode(real)).hexdigest()


def identity_base(config_path):
    name, digest = config_identity(config_path)
    return os.path.join(identity_dir(), "%s-%s" % (name, digest[:16]))


def lock_path(config_path):
    return identity_base(config_path) + ".lock"


def state_path(config_path):
    return identity_base(config_path) + ".state"


def marker_prefix(config_path):
    return config_identity(config_path)[1][:16]


def default_socket(config_path):
    name, digest = config_identity(config_path)
    return os.path.join(default_runtime_dir(), "%s-%s.sock" % (name, digest[:8]))


def socket_path(config):
    return config.settings["socket"] or default_socket(config.path)


def make_private_dir(path, private=False):
    """A folder for a socket (or, private, for our locks and state).  What we create,
    parents included, is 0700.  A folder that exists keeps its mode and owner (as root,
    `socket = /tmp/x.sock` must not make /tmp 0700) and is refused if it belongs to
    someone other than root and us; a private one must be ours and closed to others."""
    missing, p = [], os.path.abspath(path)
    while not os.path.lexists(p):
        missing.append(p)
        p = os.path.dirname(p)
    for d in reversed(missing):
        try:
            os.mkdir(d, 0o700)
        except FileExistsError:
            continue              # a racing start made it: checked below as an existing one
        os.chmod(d, 0o700)        # a umask of 0777 would have left it unusable
    st = os.stat(path)
    if not stat.S_ISDIR(st.st_mode):
        raise OSError(errno.ENOTDIR, "%s is not a folder" % path)
    if st.st_uid not in ((os.geteuid(),) if private else (0, os.geteuid())):
        raise OSError(errno.EPERM, "%s belongs to uid %d, not to us" % (path, st.st_uid))
    if private and st.st_mode & 0o022:
        raise OSError(errno.EPERM, "%s can be written by other users (chmod 700 it)" % path)


def _lock_text(fd):
    try:
        return os.pread(fd, 4096, 0).decode("utf-8", "replace")
    except OSError:
        return ""


def _legacy_holder(path):
    """1.0.0 kept its lock beside the socket: a supervisor of that release still
    running is found there (and its leftover file, unheld, is removed)."""
    try:
        fd = os.open(path, os.O_RDWR | os.O_CLOEXEC | os.O_NOFOLLOW)
    except OSError:
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return _lock_text(fd).strip() or "?"
        try:
            os.unlink(path)
        except OSError:
            pass
        return None
    finally:
        os.close(fd)


def acquire_lock(config_path, sock_path, legacy=True):
    """One supervisor per config: an flock on lock_path(config_path), which the kernel
    releases when its holder dies.  The file names the holder and its socket."""
    path = lock_path(config_path)
    make_private_dir(os.path.dirname(path), private=True)
    holder = _legacy_holder(sock_path + ".lock") if legacy else None
    if holder:
        raise AlreadyRunning(holder)
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            text = _lock_text(fd)
            os.close(fd)
            raise AlreadyRunning(text.split("\n", 1)[0].strip() or "?") from None
        # the holder removes the file at its exit before it lets go: a lock won on
        # a file that is no longer at the path is no lock (take the new file's)
        try:
            here, st = os.fstat(fd), os.stat(path)
            if (here.st_dev, here.st_ino) == (st.st_dev, st.st_ino):
                break
        except FileNotFoundError:
            pass
        os.close(fd)
    os.ftruncate(fd, 0)
    os.pwrite(fd, ("%d\n%s\n" % (os.getpid(), sock_path)).encode(), 0)
    return fd


def release_lock(fd, path):
    """At a clean exit: the file goes first, while we still hold it (acquire_lock)."""
    try:
        here, st = os.fstat(fd), os.stat(path)
        if (here.st_dev, here.st_ino) == (st.st_dev, st.st_ino):
            os.unlink(path)
    except OSError:
        pass
    try:
        os.close(fd)
    except OSError:
        pass


def running_socket(config_path):
    """The socket of the supervisor running this config, from its lock file, or None."""
    try:
        with open(lock_path(config_path), "rb") as f:
            text = f.read(4096).decode("utf-8", "replace")
        pid, sock = text.split("\n", 1)
        sock = sock[:-1] if sock.endswith("\n") else sock
        os.kill(int(pid), 0)
    except (OSError, ValueError):
        return None
    return sock if os.path.exists(sock) else None


# -- processes that are not our children ----------------------------------

def proc_fields(pid):
    """/proc/PID/stat after the command name: [0] state, [3] session, [19] start time."""
    # os.open and one read: open() would add an fstat, an ioctl and two lseeks
    # to every spawn (each records its process's start time)
    try:
        fd = os.open("/proc/%d/stat" % pid, os.O_RDONLY | os.O_CLOEXEC)
        try:
            data = os.read(fd, 4096)
        finally:
            os.close(fd)
        return data[data.rindex(b")") + 2:].split()
    except (OSError, ValueError):
        return None


def proc_start_time(pid):
    """Field 22 of /proc/PID/stat (clock ticks after boot): with the PID, it names one
    process for the boot's whole life, where a PID alone may be reused."""
    fields = proc_fields(pid)
    return int(fields[19]) if fields and fields[0] not in (b"Z", b"X") else None


def proc_marker(pid):
    """The service marker in a process's environment; '' if it has none, None if
    its environment cannot be read (another user, or not dumpable)."""
    try:
        with open("/proc/%d/environ" % pid, "rb") as f:
            env = f.read()
    except OSError:
        return None
    for item in env.split(b"\0"):
        if item.startswith(SERVICE_MARKER.encode() + b"="):
            return item[len(SERVICE_MARKER) + 1:].decode("utf-8", "replace")
    return ""


_BOOT_ID = []


def boot_id():
    if not _BOOT_ID:
        try:
            with open("/proc/sys/kernel/random/boot_id") as f:
                _BOOT_ID.append(f.read().strip())
        except OSError:
            _BOOT_ID.append("")
    return _BOOT_ID[0]


def _syscall(number, *args):
    import ctypes         # only when adopting: it would stay in memory for the supervisor's life
    if os.uname().machine not in UNIFIED_SYSCALLS:
        raise OSError(errno.ENOSYS, "no syscall numbers known for %s" % os.uname().machine)
    libc = ctypes.CDLL(None, use_errno=True)
    result = libc.syscall(ctypes.c_long(number), *[ctypes.c_long(a) for a in args])
    if result < 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
    return result


def pidfd_open(pid):
    """A pidfd of any process (Python 3.9+ has os.pidfd_open; 3.8 asks the kernel)."""
    if hasattr(os, "pidfd_open"):
        return os.pidfd_open(pid)
    fd = _syscall(SYS_PIDFD_OPEN, pid, 0)
    os.set_inheritable(fd, False)
    return fd


def take_fds(pidfd, fds):
    """Copies of another process's fds (pidfd_getfd, Linux 5.6+; close-on-exec).  The
    kernel asks for ptrace rights: root, or the same user on a process that is dumpable
    (and, with Yama, ptrace_scope 0).  OSError otherwise; nothing is left open then."""
    taken = []
    try:
        for fd in fds:
            taken.append(_syscall(SYS_PIDFD_GETFD, pidfd, fd, 0))
    except OSError:
        for fd in taken:
            os.close(fd)
        raise
    return taken


def hold_above(fd):
    """The read end moved to HELD_FD_FLOOR or above (the old fd closed once it is); the
    service gets its copy at that number."""
    high = fcntl.fcntl(fd, getattr(fcntl, "F_DUPFD_CLOEXEC", 1030), HELD_FD_FLOOR)
    os.close(fd)
    return high


class AdoptedWatch:
    """Exits of adopted processes.  They are not our children: no SIGCHLD, no waitid,
    no exit status.  Their pidfd becomes readable when they exit, whichever child
    watcher runs; without pidfds (kernel < 5.3) their start time is checked every
    ADOPTED_POLL seconds, which a reused PID cannot pass.  host: the loop's narrow
    interface (watch_fd, unwatch_fd, call_at, cancel_timer)."""

    def __init__(self, host):
        self.host = host
        self.pidfds = {}          # pid -> pidfd
        self.polls = {}           # pid -> timer

    def watch(self, pid, starttime, pidfd, callback):
        if pidfd is not None:
            self.pidfds[pid] = pidfd
            self.host.watch_fd(pidfd, selectors.EVENT_READ, lambda mask: self._gone(pid, callback))
        else:
            self._poll(pid, starttime, callback)

    def _poll(self, pid, starttime, callback):
        if proc_start_time(pid) != starttime:
            self._gone(pid, callback)
        else:
            self.polls[pid] = self.host.call_at(monotonic() + ADOPTED_POLL, self._poll,
                                                pid, starttime, callback)

    def _gone(self, pid, callback):
        self.forget(pid)
        callback(pid, None)

    def forget(self, pid):
        fd = self.pidfds.pop(pid, None)
        if fd is not None:
            self.host.unwatch_fd(fd)
            os.close(fd)
        self.host.cancel_timer(self.polls.pop(pid, None))


def adopted_watch(sup):
    if sup.adopted_watch is None:
        sup.adopted_watch = AdoptedWatch(sup)
    return sup.adopted_watch


# -- the state file ---------------------------------------------------------

def state_header(sup):
    """The state file's header; its "services" are state_entry's, one a service."""
    return {"respawn_state": STATE_FORMAT, "version": __version__, "boot_id": boot_id(),
            "config": os.path.realpath(sup.config.path), "supervisor": os.getpid()}


def state_entry(sup, svc):
    """One service's entry in the state file."""
    live = sup.live[svc.name]
    entry = {"name": svc.name, "wanted": svc.want == UP, "restarts": svc.restarts}
    if svc.pid is not None and live.starttime is not None:
        held = []
        for pipe in sup.pipes_of.get(svc.name, ()):
            # (a pipe of an earlier process of the service, still open, is not held by this one)
            if pipe.held_pid == svc.pid:
                if pipe.ino is None:
                    pipe.ino = os.fstat(pipe.fd).st_ino
                held.append([pipe.stream, pipe.held_fd, pipe.ino])
        entry.update(pid=svc.pid, starttime=live.starttime, started=svc.started, marker=live.marker,
                     pipes=sorted(held), notify=live.notify[1] if live.notify else None)
    return entry


def write_state(path, snapshot):
    """Atomic: a reader (the next supervisor) sees the old file or the new one, whole.
    No fsync: the file is for a supervisor that crashed, not a machine (after a
    reboot its PIDs mean nothing, and boot_id says so)."""
    tmp = path + ".tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
    try:
        try:
            write_all(fd, snapshot)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except OSError:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def _check_entry(e):
    if not isinstance(e, dict) or not isinstance(e.get("name"), str):
        return "a service entry without a name"
    if not isinstance(e.get("wanted", True), bool) or not _is_int(e.get("restarts", 0)):
        return "service %r: bad wanted or restarts" % e["name"]
    if "pid" not in e:
        return None
    if not (_is_int(e["pid"]) and e["pid"] > 0 and _is_int(e.get("starttime"))):
        return "service %r: bad pid or start time" % e["name"]
    if not isinstance(e.get("started"), (int, float)) or isinstance(e.get("started"), bool):
        return "service %r: bad start time" % e["name"]
    pipes = e.get("pipes")
    if not isinstance(pipes, list) or not all(
            isinstance(p, list) and len(p) == 3 and p[0] in ("stdout", "stderr")
            and _is_int(p[1]) and p[1] >= 0 and _is_int(p[2]) for p in pipes):
        return "service %r: bad pipes" % e["name"]
    if e.get("notify") is not None and not (isinstance(e["notify"], str) and e["notify"].startswith("@")):
        return "service %r: bad notify address" % e["name"]
    if e.get("marker") is not None and not isinstance(e["marker"], str):
        return "service %r: bad marker" % e["name"]
    return None


def _is_int(v):
    return isinstance(v, int) and not isinstance(v, bool)


def read_state(path, config_path):
    """(snapshot, problem): (None, None) when there is none to take (no file, or one
    from before a reboot), (None, why) when it cannot be trusted."""
    try:
        with open(path, "rb") as f:
            data = f.read(64 << 20)
    except FileNotFoundError:
        return None, None
    except OSError as exc:
        return None, "cannot read it: %s" % exc.strerror
    try:
        snap = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        return None, "corrupt or truncated (%s)" % exc
    if not isinstance(snap, dict) or "respawn_state" not in snap:
        return None, "not a respawn state file"
    if snap["respawn_state"] != STATE_FORMAT:
        return None, "format %r from version %s; this version %s reads format %d" % (
            snap["respawn_state"], snap.get("version"), __version__, STATE_FORMAT)
    if snap.get("boot_id") != boot_id():
        return None, None         # written before a reboot: none of its processes exists
    if snap.get("config") != os.path.realpath(config_path):
        return None, "written for another config (%s)" % snap.get("config")
    if not isinstance(snap.get("services"), list):
        return None, "no service list"
    for e in snap["services"]:
        problem = _check_entry(e)
        if problem:
            return None, problem
    return snap, None


def adoptable(entry, marker):
    """'adopt', 'gone' or 'foreign', and why: whether the process a state entry names
    is still that service.  Same PID and start time (a reused PID has another), still
    leading its own session (each service does), and, where its environment can be
    read (not so for a process that made itself undumpable), this service's marker
    (unless it was started by 1.0.0, which gave none: the entry says so)."""
    pid = entry["pid"]
    fields = proc_fields(pid)
    if fields is None or fields[0] in (b"Z", b"X"):
        return "gone", "pid %d exited" % pid
    if int(fields[19]) != entry["starttime"]:
        return "gone", "pid %d exited (the pid now belongs to another process)" % pid
    if int(fields[3]) != pid:
        return "foreign", "pid %d of %s does not lead its own session" % (pid, entry["name"])
    if entry.get("marker") is None:
        return "adopt", None
    if entry["marker"] != marker:
        return "foreign", "the entry of %s names the marker %s" % (entry["name"], entry["marker"])
    found = proc_marker(pid)
    if found is not None and found != marker:
        return "foreign", "pid %d of %s %s" % (pid, entry["name"], "carries %s=%s" % (
            SERVICE_MARKER, found) if found else "has no %s in its environment" % SERVICE_MARKER)
    return "adopt", None


def find_marked(prefix):
    """Services of this config still running, found by their marker: {name: pid}.
    Only session leaders count (a service's children inherit its environment)."""
    found = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        pid = int(name)
        fields = proc_fields(pid)
        if not fields or int(fields[3]) != pid or fields[0] in (b"Z", b"X"):
            continue
        marker = proc_marker(pid)
        if marker and marker.startswith(prefix + "/"):
            found.setdefault(marker[len(prefix) + 1:], pid)
    return found


class StateFile:
    """The state on disk: written when it changes, once per loop turn however many
    changes that turn made (a timer due at once), and only if the bytes differ.
    Each service's entry is encoded again only when that service had an event, and
    the file is the entries joined: a restart costs the same at 10 services as at
    5000 (encoding the whole snapshot at every change was 46 ms of CPU per restart
    at 5000, most of the supervisor's work)."""

    def __init__(self, sup, path):
        self.sup, self.path = sup, path
        self.due = False
        self.entries = {}         # name -> its entry's JSON bytes, in the services' order
        self.dirty = None         # names whose entry may have changed; None: every one
        self.header = None        # the bytes before the entries
        self.stale = True         # the file does not hold entries and header (yet, or a write failed)
        self.failed = False

    def changed(self, name=None):
        """Something of service `name` may have changed; None: of any (services were
        added or removed, or the state was taken over)."""
        if name is None:
            self.dirty = None
        elif self.dirty is not None:
            self.dirty.add(name)
        if not self.due:
            self.due = True
            # now, not 0: it sorts after every timer already due, so a turn that runs
            # many (5000 services' startsecs ending at once) writes once, at its end
            # (at 0 it ran after each of them: one write per timer)
            self.sup.timers.at(monotonic(), self.flush)

    def flush(self):
        self.due = False
        sup, dirty = self.sup, self.dirty
        self.dirty = set()
        if dirty is None or not dirty <= self.entries.keys():
            entries = {name: encode_compact(state_entry(sup, svc)) for name, svc in sup.services.items()}
            if entries != self.entries:
                self.entries, self.stale = entries, True
        else:
            for name in dirty:
                svc = sup.services.get(name)
                if svc is None:       # forgotten: its entry goes with a full rebuild
                    self.dirty = None
                    continue
                data = encode_compact(state_entry(sup, svc))
                if data != self.entries[name]:
                    self.entries[name], self.stale = data, True
        header = encode_compact(state_header(sup))[:-1] + b',"services":['
        if header != self.header:
            self.header, self.stale = header, True
        if self.dirty is None:
            return self.flush()
        if dirty is None or len(dirty) > 256:
            sup.release_memory_soon()     # its garbage stays resident otherwise (2 MiB at 5000)
        if not self.stale:
            return
        try:
            write_state(self.path, b"".join((header, b",".join(self.entries.values()), b"]}")))
        except OSError as exc:
            if not self.failed:
                self.sup.log("error", "cannot write the state file %s: %s; a crash now would "
                             "leave services the next supervisor cannot adopt" % (self.path, exc.strerror))
            self.failed = True
            return
        if self.failed:
            self.sup.log("info", "the state file %s is written again" % self.path)
        self.failed = self.stale = False

    def remove(self):
        for p in (self.path, self.path + ".tmp"):
            try:
                os.unlink(p)
            except OSError:
                pass


def encode_compact(value):
    return json.dumps(value, separators=(",", ":")).encode()


# -- adoption ---------------------------------------------------------------

def take_over(sup):
    """At `run`, under the lock, before any service starts: adopt what the last
    supervisor left running, restart by its policy what died meanwhile, and start
    nothing that may still run.  Then keep the state file."""
    path = state_path(sup.config.path)
    snap, problem = read_state(path, sup.config.path)
    prefix = marker_prefix(sup.config.path)
    if snap is not None and problem is None:
        for e in snap["services"]:
            if "pid" in e:
                e["verdict"] = adoptable(e, "%s/%s" % (prefix, e["name"]))
        foreign = [e["verdict"][1] for e in snap["services"] if e.get("verdict", ("",))[0] == "foreign"]
        if foreign:
            problem = "it names a process that is not ours: %s" % foreign[0]
    if problem:
        found = find_marked(prefix)
        for e in (snap or {}).get("services", ()):
            # not proven ours, nor proven gone: it may be the service (one that cleared
            # its environment), so the service is not started beside it
            if e.get("verdict", ("gone",))[0] != "gone":
                found.setdefault(e["name"], e["pid"])
        leave_alone(sup, path, problem, found)
    elif snap is not None:
        gone = []
        for e in snap["services"]:
            svc = sup.services.get(e["name"])
            if svc is not None and svc.want != FORGET:
                # what was asked (by the operator too), and the restarts counted
                restore_record(svc, restarts=e.get("restarts", 0),
                               want=(UP if e["wanted"] else DOWN) if "wanted" in e else svc.want)
            verdict, why = e.get("verdict", (None, None))
            if verdict == "adopt" and svc is None:
                sup.log("warn", "pid %d of %s is left running: the config has no such service now"
                        % (e["pid"], e["name"]))
            elif verdict == "adopt":
                if not adopt(sup, svc, e):
                    gone.append((svc, e, "pid %d exited" % e["pid"]))
            elif verdict == "gone" and svc is not None:
                gone.append((svc, e, why))
        for svc, e, why in gone:
            died_meanwhile(sup, svc, e, why)
    keep_state_file(sup, path)


def keep_state_file(sup, path):
    sup.state_file = StateFile(sup, path)
    sup.on_state_change.append(lambda svc, old, new: sup.state_file.changed(svc.name))
    sup.state_file.changed()


def restore_record(svc, **fields):
    """Adoption takes records over as a re-exec's restore does: field by field, from
    the state file, before any event about them; from then on step alone changes them."""
    for key, value in fields.items():
        assert key in Service.CARRIED, key
        setattr(svc, key, value)


def take_over_or_leave_alone(sup):
    """take_over; a bug in it is logged where it is (internal_error), and what it had
    not taken over yet is left alone if it runs: never a second copy."""
    try:
        take_over(sup)
    except Exception as exc:
        sup.internal_error(exc)
        path = state_path(sup.config.path)
        found = {n: pid for n, pid in find_marked(marker_prefix(sup.config.path)).items()
                 if n in sup.services and not sup.services[n].alive()}
        leave_alone(sup, path, "taking it over failed", found)
        if sup.state_file is None:
            keep_state_file(sup, path)


def adopt(sup, svc, e):
    """Take over one service's process: watch it, take its output back, hear its notify
    socket.  False if it is gone after all (checked again once its pidfd pins it)."""
    pid = e["pid"]
    try:
        pidfd = pidfd_open(pid)
    except ProcessLookupError:
        return False
    except OSError:
        pidfd = None              # no pidfds here: watched by its start time
    if proc_start_time(pid) != e["starttime"]:
        if pidfd is not None:
            os.close(pidfd)
        return False
    live = sup.live[svc.name]
    live.starttime, live.adopted, live.marker = e["starttime"], True, e.get("marker")
    now = monotonic()
    prog = svc.program
    # running and ready, as it was; its checks due afresh
    restore_record(svc, pid=pid, state=RUNNING, ready=True, reason="adopted", started=e["started"],
                   started_mono=now - max(0.0, time.time() - e["started"]),
                   health_at=now + prog.healthcheck_interval if prog.healthcheck else None,
                   watchdog_at=now + prog.watchdog if prog.watchdog and prog.ready[0] == "notify" else None)
    problem = None
    if e["pipes"]:
        try:
            if pidfd is None:
                raise OSError(errno.ENOSYS, "no pidfd")
            fds = take_fds(pidfd, [held for _, held, _ in e["pipes"]])
        except OSError as exc:
            problem = "pidfd_getfd refused: %s" % (exc.strerror or exc)
            fds = []
        for (stream, held, ino), fd in zip(e["pipes"], fds):
            st = os.fstat(fd)
            if not stat.S_ISFIFO(st.st_mode) or st.st_ino != ino:
                os.close(fd)
                problem = "its fd %d is not its %s pipe any more" % (held, stream)
                continue
            pipe = Pipe(fd, svc.name, stream, held=(pid, held))
            pipe.ino = ino
            sup.add_pipe(pipe)
    if e.get("notify"):
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        try:
            sock.bind("\0" + e["notify"][1:])      # the address in its environment
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
            sock.setblocking(False)
            sup.adopt_notify(svc, sock, e["notify"])
        except OSError as exc:
            sock.close()
            sup.log("warn", "cannot listen on its notify socket again: %s" % exc, svc.name)
    if problem:
        sup.log("warn", "adopted pid %d without its output (%s): what it writes waits in its pipe "
                "(it blocks once the pipe is full); a restart reconnects its output" % (pid, problem),
                svc.name)
    else:
        sup.log("info", "adopted pid %d%s" % (pid, " and its output" if e["pipes"] else ""), svc.name)
    watch_adopted(sup, svc, pidfd)
    for what, when in svc.deadlines():
        sup.do_arm(svc, Arm(what, when))
    return True


def watch_adopted(sup, svc, pidfd):
    def exited(pid, status):
        sup.live[svc.name].adopted = False
        if svc.pid == pid:
            sup.log("info", "adopted pid %d exited (not our child: its exit status is unknown)" % pid,
                    svc.name)
        sup.on_child_exit(pid, None, svc)
    adopted_watch(sup).watch(svc.pid, sup.live[svc.name].starttime, pidfd, exited)


def rewatch_adopted(sup, svc):
    """After a re-exec: an adopted process is watched again, if it is still itself."""
    try:
        pidfd = pidfd_open(svc.pid)
    except ProcessLookupError:
        pidfd = None
    except OSError:
        pidfd = None
    if proc_start_time(svc.pid) != sup.live[svc.name].starttime:
        if pidfd is not None:
            os.close(pidfd)
        return False
    watch_adopted(sup, svc, pidfd)
    return True


def died_meanwhile(sup, svc, e, why):
    """A service that exited while no supervisor ran: its policy decides, as for any
    exit (its status is unknown: not an expected exit code)."""
    sup.log("info", "%s while no supervisor ran" % why, svc.name)
    if svc.want != UP:
        return
    # running, as it was (without a pid: nothing of its old group is signalled), then its exit
    restore_record(svc, state=RUNNING, ready=True, started=e["started"],
                   started_mono=monotonic() - max(0.0, time.time() - e["started"]))
    sup.feed(svc, Exited(None, "exited while no supervisor ran (exit status unknown)"))


def leave_alone(sup, path, problem, found):
    """A state file we cannot trust: refused in one line.  Nothing it names is touched;
    a service still running (found by its marker) is not started again, only watched,
    and starts once that process is gone."""
    alive = {n: pid for n, pid in found.items() if n in sup.services}
    sup.log("error", "state file %s refused: %s; %s" % (
        path, problem, "starting only services not running (left alone: %s)" % ", ".join(
            "%s pid %d" % item for item in sorted(alive.items())) if alive
        else "no service of this config is running: starting as usual"))
    for name, pid in alive.items():
        svc = sup.services[name]
        restore_record(svc, want=DOWN, reason="not started: pid %d may still run it (state file refused)" % pid)
        try:
            pidfd = pidfd_open(pid)
        except OSError:
            pidfd = None
        starttime = proc_start_time(pid)
        if starttime is None and pidfd is not None:
            os.close(pidfd)

        def gone(p, status, svc=svc):
            if svc.alive() or svc.state != STOPPED or not svc.reason.startswith("not started: pid"):
                return            # the operator started or stopped it meanwhile
            sup.log("info", "pid %d is gone: %s" % (p, "starting" if svc.program.autostart else "free"),
                    svc.name)
            if svc.program.autostart:
                sup.feed(svc, Want(UP, False))
        if starttime is not None:
            adopted_watch(sup).watch(pid, starttime, pidfd, gone)


def leave_no_trace(sup, sock):
    """At exit: the socket, the state file (only if nothing runs: after a crash of
    the loop the next supervisor still adopts what is left) and the lock go."""
    if sock and os.path.exists(sock) and sup.listener is None:
        try:
            if stat.S_ISSOCK(os.lstat(sock).st_mode):
                os.unlink(sock)
        except OSError:
            pass
    if sup.state_file is not None and not any(s.alive() for s in sup.services.values()):
        sup.state_file.remove()
    if sup.lock_fd is not None:
        try:                      # where it is now, even if the config was moved meanwhile
            path = os.readlink("/proc/self/fd/%d" % sup.lock_fd)
        except OSError:
            path = lock_path(sup.config.path)
        release_lock(sup.lock_fd, path)
        sup.lock_fd = None


def resume_identity(sup):
    """The new image after a re-exec keeps the state file, and takes the lock where
    this release keeps it if the old image (1.0.0) held it beside the socket."""
    path = lock_path(sup.config.path)
    try:
        here, st = os.fstat(sup.lock_fd), os.stat(path)
        current = (here.st_dev, here.st_ino) == (st.st_dev, st.st_ino)
    except (OSError, TypeError):
        current = False
    if not current:
        try:
            fd = acquire_lock(sup.config.path, socket_path(sup.config), legacy=False)
        except (AlreadyRunning, OSError) as exc:
            sup.log("error", "cannot take the lock %s: %s" % (path, exc))
        else:
            old, sup.lock_fd = sup.lock_fd, fd
            if old is not None:
                try:
                    legacy = os.readlink("/proc/self/fd/%d" % old)
                except OSError:
                    legacy = None
                release_lock(old, legacy) if legacy else os.close(old)
    keep_state_file(sup, state_path(sup.config.path))


# ---------------------------------------------------------------------------
# Client: talk to the running supervisor
# ---------------------------------------------------------------------------

class NoSupervisor(Exception):
    pass


def _send_request(path, cmd, args, timeout):
    """A connected socket with one request sent."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.connect(path)
    except (FileNotFoundError, ConnectionRefusedError, NotADirectoryError):
        sock.close()
        raise NoSupervisor("no supervisor is running (nothing answers on %s)" % path) from None
    except PermissionError:
        sock.close()
        raise NoSupervisor("permission denied on %s" % path) from None
    sock.settimeout(timeout)
    try:
        sock.sendall(json.dumps({"v": PROTOCOL, "cmd": cmd, "args": args or {}}).encode() + b"\n")
    except (BrokenPipeError, ConnectionResetError):
        pass                    # it may have answered (and closed) already: read that
    except BaseException:
        sock.close()
        raise
    return sock


def request(path, cmd, args=None, timeout=None):
    """Send one request; yield each JSON object the supervisor answers."""
    sock = _send_request(path, cmd, args, timeout)
    try:
        # a line can be long (an older supervisor's status of 5000 services is one of
        # 1.5 MB): its pieces are joined once, and each piece is searched for the
        # newline once (not the whole line again)
        pieces = []
        for data in _received(sock):
            start, end = 0, data.find(b"\n")
            while end >= 0:
                pieces.append(data[start:end])
                line, pieces = b"".join(pieces), []
                yield json.loads(line.decode())
                start, end = end + 1, data.find(b"\n", end + 1)
            if start < len(data):
                pieces.append(data[start:])
    finally:
        sock.close()


def request_whole(path, cmd, args=None, timeout=None):
    """Send one request; the supervisor's whole answer, its bytes up to its close."""
    sock = _send_request(path, cmd, args, timeout)
    try:
        return b"".join(_received(sock))
    finally:
        sock.close()


def _received(sock):
    """What the supervisor sends, piece by piece, until it closes."""
    while True:
        try:
            data = sock.recv(RECV_SIZE)
        except ConnectionResetError:
            return
        if not data:
            return
        yield data


# `status --json`'s layout, told to scripts by its "schema" key (README: every
# key's meaning).  A key is only ever added; a change of meaning is a new number.
STATUS_SCHEMA = 1


def client_error(message, as_json=False, code=EXIT_FAIL):
    """A client's failure: its lines on stderr and, with --json, {"error": ...} on
    stdout too, so that `status --json 2>/dev/null | jq` always reads one object."""
    sys.stdout.flush()
    sys.stderr.write(message.rstrip("\n") + "\n")
    sys.stderr.flush()
    if as_json:
        sys.stdout.write(json.dumps({"error": message.rstrip("\n")}) + "\n")
    return code


def format_status_json(doc, services):
    """`status --json`'s text, as bytes with its newline: indented as before, but
    each service on one line of its own (grep and diff read it line by line; jq
    and json.loads as any JSON).  doc: the keys but "services", which comes last;
    services: the services' texts joined by ",\n    " (bytes), each json.dumps
    without indent, as the supervisor sent it (serve_status) or as encoded here
    from an older one's answer.  That is the C encoder: indent=2 runs the
    pure-Python one, ~3x slower (70 against 25 ms for 5000 services); the
    supervisor's few keys keep their indent."""
    lines = []
    for key, value in doc.items():      # a newline in a string is written \n: these are the layout's
        lines.append("  %s: %s,\n" % (json.dumps(key), json.dumps(value, indent=2).replace("\n", "\n  ")))
    head = ("{\n%s  \"services\": " % "".join(lines)).encode()
    return b"".join((head, b"[\n    ", services, b"\n  ]\n}\n") if services else (head, b"[]\n}\n"))


def write_stdout(data):
    """Bytes on stdout, in one go past its text layer; False if its reader is gone
    (`status --json | head -1`: exit 1 then, as print's BrokenPipeError made it)."""
    try:
        fd = sys.stdout.fileno()
    except (AttributeError, OSError, ValueError):      # a StringIO in place of stdout
        sys.stdout.write(data.decode())
        return True
    sys.stdout.flush()
    return write_all(fd, data)


def format_status(services):
    rows = []
    for s in services:
        if s["pid"]:
            detail = "pid %d, uptime %s" % (s["pid"], fmt_duration(s["uptime"] or 0))
            if s.get("adopted"):
                detail += ", adopted"
        elif s["state"] == BACKOFF:
            detail = "%s; retry in %.1fs" % (s["reason"] or "", s.get("retry_in") or 0)
        elif s["exitstatus"] is not None:
            detail = describe_exit(s["exitstatus"])
            if s["reason"] and s["reason"].startswith(detail):
                detail = s["reason"]          # the reason already says how it exited
            elif s["reason"]:
                detail += "; " + s["reason"]
        else:
            detail = s["reason"] or ""
        if s.get("status"):
            detail += " (%s)" % s["status"]
        rows.append((s["name"], s["state"], str(s.get("restarts") or 0), detail))
    width = max([len(r[0]) for r in rows] + [4])
    digits = max([len(r[2]) for r in rows] + [1])
    return "\n".join(("%-*s  %-9s restarts %-*s  %s" % (width, n, st, digits, r, d)).rstrip()
                     for n, st, r, d in rows)


# ---------------------------------------------------------------------------
# Command line: run, check, and the client commands
# ---------------------------------------------------------------------------

def write_pidfile(path):
    tmp = "%s.%d.tmp" % (path, os.getpid())
    with open(tmp, "w") as f:
        f.write("%d\n" % os.getpid())
    os.replace(tmp, path)


class NoConfig(Exception):
    pass


def find_config(explicit):
    """-c FILE, else the first of SPEC's four places that holds a file."""
    if explicit:
        return explicit
    env = os.environ.get("RESPAWN_CONFIG")
    beside = os.path.join(os.path.dirname(os.path.realpath(__file__)), "respawn.ini")
    for c in (env, "respawn.ini", beside, "/etc/respawn.ini"):
        if c and os.path.isfile(c):
            return c
    try:
        here = os.getcwd()
    except OSError:           # the working folder was removed under us
        here = "the working folder"
    raise NoConfig("no config file found: looked for $RESPAWN_CONFIG (%s), ./respawn.ini (in %s), "
                   "%s (beside the script) and /etc/respawn.ini; name one with -c FILE"
                   % (env or "not set", here, beside))


def print_problems(exc, out=sys.stderr):
    for w in exc.warnings:
        out.write("%s: %s: %s\n" % (str(w).split(": ", 1)[0], w.level, w.message))
    for e in exc.errors:
        out.write("%s\n" % e)


def notify_systemd(message, address):
    """READY=1 to systemd when it started us with Type=notify."""
    if not address:
        return
    if address.startswith("@"):
        address = "\0" + address[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
            # never waits: a peer whose queue is full (max_dgram_qlen datagrams
            # unread) would block a blocking send, and with it the whole loop;
            # the message is dropped instead, as sd_notify's failures are ignored
            s.setblocking(False)
            s.connect(address)
            s.send(message.encode())
    except OSError:
        pass


_ARGV_AREA = []          # [(start, end, tail)] of our argv in memory, once found


def set_process_title(sup):
    """What ps, top, pgrep and `systemctl status` show for the supervisor.

    comm (15 bytes: `ps -e`, top, systemd's "Main PID: N (respawn.py)") is set
    through /proc/self/comm, which is prctl(PR_SET_NAME) without ctypes.  The
    command line is the loader's (`python3 -I -S -c import marshal,...`, 500
    bytes): its interpreter part is overwritten in place, through /proc/self/mem,
    with a title, and our own arguments (script, -c CONFIG, run) are kept after
    it, so `pgrep -f CONFIG` and tools that read argv still find us.  The kernel
    shows the area up to its end: the rest is padded with NULs.  Wherever any of
    this is not allowed, the title stays as it was."""
    count = sum(1 for svc in sup.services.values() if svc.want != FORGET)
    title = "respawn.py: supervising %s (%s)" % (plural(count, "service"), sup.config.path)
    try:
        with open("/proc/self/comm", "w") as f:
            f.write("respawn.py")
    except OSError:
        pass
    try:
        if not _ARGV_AREA:
            with open("/proc/self/stat", "rb") as f:
                fields = f.read().rsplit(b")", 1)[1].split()
            start, end = int(fields[45]), int(fields[46])      # arg_start, arg_end
            with open("/proc/self/cmdline", "rb") as f:
                current = f.read()
            tail = b"".join(os.fsencode(a) + b"\0" for a in sys.argv)
            # only an area that is exactly argv: ours, as the kernel placed it
            if end - start != len(current) or not current.endswith(b"\0" + tail):
                return
            _ARGV_AREA.append((start, end, tail))
        start, end, tail = _ARGV_AREA[0]
        text = os.fsencode(title)[:255] + b"\0" + tail
        if len(text) > end - start:
            return                  # no room (started without the loader): keep the real one
        fd = os.open("/proc/self/mem", os.O_WRONLY | os.O_CLOEXEC)
        try:
            os.pwrite(fd, text.ljust(end - start, b"\0"), start)
        finally:
            os.close(fd)
    except (OSError, ValueError, IndexError, OverflowError):
        pass


def daemonize():
    """Double fork and setsid.  The first parent waits on a pipe until the
    supervisor is up (or says why not) and exits with the matching code."""
    r, w = os.pipe()
    if os.fork() > 0:
        os.close(w)
        data = b""
        while True:
            chunk = os.read(r, 4096)
            if not chunk:
                break
            data += chunk
        text = data.decode("utf-8", "replace").strip()
        if text.startswith("ok"):
            _, pid, logfile = (text.split(None, 2) + [""])[:3]
            print("started (pid %s)%s" % (pid, "; its log: %s" % logfile if logfile else ""),
                  flush=True)                                         # os._exit does not flush
            os._exit(EXIT_OK)
        if text.startswith("already"):
            print(text[len("already "):], flush=True)
            os._exit(EXIT_OK)
        sys.stderr.write((text or "the supervisor exited before it was up") + "\n")
        sys.stderr.flush()
        os._exit(EXIT_FAIL)
    os.close(r)
    os.setsid()
    if os.fork() > 0:
        os._exit(0)
    os.chdir("/")
    null = os.open(os.devnull, os.O_RDWR)
    os.dup2(null, 0)
    os.close(null)
    return w


def redirect_output(path):
    """In daemon mode the supervisor's stdout and stderr (and so services' prefixed
    lines) go to the logfile: nothing is lost to a closed terminal."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)


def claim_std_fds():
    """A supervisor started with stdin, stdout or stderr closed gets /dev/null
    there: else the next file it opens (its lock, a socket) would take fd 1 or 2
    and receive its output."""
    for fd in (0, 1, 2):
        try:
            os.fstat(fd)
        except OSError:
            null = os.open(os.devnull, os.O_RDWR)
            if null != fd:
                os.dup2(null, fd)
                os.close(null)


def cmd_run(args, config_path, script, source):
    claim_std_fds()
    try:
        config = load_config(config_path)
    except ConfigErrors as exc:
        print_problems(exc)
        return EXIT_CONFIG
    for w in config.warnings:
        sys.stderr.write("%s: %s: %s\n" % (str(w).split(": ", 1)[0], w.level, w.message))
    sock_path = socket_path(config)
    report = None
    if args.daemon:
        report = daemonize()
        logfile = config.settings["logfile"] or os.path.join(
            config.settings["logdir"] or default_logdir(),
            os.path.basename(sock_path)[:-5] + ".log")
        try:
            redirect_output(logfile)
        except OSError as exc:
            os.write(report, ("cannot open %s: %s" % (logfile, exc.strerror)).encode())
            return EXIT_FAIL
    try:
        lock_fd = acquire_lock(config.path, sock_path)
    except AlreadyRunning as exc:
        message = "already running (pid %s)" % exc.args[0]
        if report is not None:
            os.write(report, ("already " + message).encode())
        else:
            print(message)
        return EXIT_OK
    except OSError as exc:
        message = "cannot take the lock %s: %s" % (lock_path(config.path), exc.strerror or exc)
        if report is not None:
            os.write(report, message.encode())
        sys.stderr.write(message + "\n")
        return EXIT_FAIL
    sup = Supervisor(config, script, ["-c", config.path, "run"], source)
    sup.lock_fd = lock_fd
    sup.pidfile = config.settings["pidfile"]
    sup.daemon_log = logfile if args.daemon else None
    try:
        sup.install_signals()
        sup.open_listener(sock_path)
        if sup.pidfile:
            try:
                write_pidfile(sup.pidfile)
            except OSError as exc:     # its own line, not the temporary file's name
                raise OSError(exc.errno, "cannot write the pidfile %s: %s" % (
                    sup.pidfile, exc.strerror or exc)) from None
    except OSError as exc:
        message = "cannot start: %s" % (exc.strerror if exc.filename is None and exc.errno else exc)
        sup.log("error", message)
        if report is not None:
            os.write(report, message.encode())
        return EXIT_FAIL
    if sup.reaper and not sup.pid1:
        if not set_subreaper():
            sup.log("warn", "subreaper = true, but prctl(PR_SET_CHILD_SUBREAPER) failed")
    sup.setup_file_watch()
    apply_process_settings(config.settings, sup.log)
    # after minfds: a supervisord config's services get the limit it raised (as there)
    problem = raise_nofile(config)
    if problem:
        sup.log("warn", problem)
    sup.log("info", "respawn %s (pid %d) supervising %s from %s; control socket %s; %s"
            % (__version__, os.getpid(), plural(len(sup.services), "service"), config.path, sock_path,
               sup.watcher.description))
    # systemd's socket is ours, not our services' (sd_notify's unset_environment):
    # a service must not tell systemd it is ready, or stopping, in our name
    ops_start(sup)
    set_process_title(sup)
    take_over_or_leave_alone(sup)
    sup.events.notify("SUPERVISOR_STATE_CHANGE_RUNNING", "")
    sup.start_all()
    if sup.systemd:
        sup.systemd.changed(sup.services)     # READY=1 now if nothing is left to wait for
    if report is not None:
        os.write(report, b"ok %d %s" % (os.getpid(), os.fsencode(os.path.abspath(logfile))))
        os.close(report)
    return supervise(sup)


def supervise(sup):
    """The loop, and what must happen however it ends."""
    sup.release_memory_soon()
    try:
        sup.run_loop()
    finally:
        try:
            sock = sup.listener.getsockname() if sup.listener else None
        except OSError:
            sock = None
        sup.close_control()
        ops_close(sup)
        leave_no_trace(sup, sock or socket_path(sup.config))
        if sup.pidfile:
            try:
                os.unlink(sup.pidfile)
            except OSError:
                pass
        for sink in sup.sinks.values():
            sink.close()
        sup.drain_output(1.0)
    return sup.exit_code


def release_free_memory():
    """What a burst of work freed (the source and marshalled code the loader read,
    a handoff's decoded state, the state file's first encoding, a reload's parse)
    stays in glibc's heap, resident, until malloc_trim gives its pages back:
    0.35 MiB of a supervisor of 100 services, 2.5 MiB of one of 5000.  Only where
    ctypes is loaded already (prctl, the file watch's inotify): importing it costs more."""
    ctypes = sys.modules.get("ctypes")
    if ctypes is not None:
        try:
            ctypes.CDLL(None).malloc_trim(0)
        except (OSError, AttributeError):       # not glibc (musl has none)
            pass


def resume(args, script, source):
    """The new image after a re-exec: take the state over, or roll back."""
    # No collection while the state is taken over: it builds a few hundred
    # thousand objects that all live on (at 5000 services the collector's
    # passes over them were a quarter of the handoff)
    gc.disable()
    fd = args.handoff
    with os.fdopen(os.dup(fd), "rb") as f:
        state = load_handoff(f.read())
    claimed = {fd, args.rollback} | set(handoff_fds(state))
    _close_strays(claimed)
    selector = None
    try:
        epoll = inherited_epoll(state) if os.environ.get("RESPAWN_ROLLED_BACK") is None else None
        selector = Selector(epoll) if epoll else None
        sup = Supervisor(handoff_load_config(state), state["script"], state["argv"], source, selector)
        state = sup.restore(state)
    except Exception as exc:      # anything at all: the old code takes over again
        if selector is not None:
            selector.close()          # what it holds is unknown now: the old code builds its own
        if args.rollback is not None and os.environ.get("RESPAWN_ROLLED_BACK") != state.get("new_hash"):
            sys.stderr.write("respawn: restore failed (%s: %s); rolling back to the previous code\n"
                             % (type(exc).__name__, exc))
            sys.stderr.flush()        # exec does not flush, and 3.8's stderr is block-buffered
            os.environ["RESPAWN_ROLLED_BACK"] = state.get("new_hash") or ""
            os.set_inheritable(fd, True)
            os.lseek(fd, 0, os.SEEK_SET)
            for extra in claimed:
                try:
                    os.set_inheritable(extra, True)
                except (OSError, TypeError):
                    pass              # closed by the failed restore, or None
            os.execv(sys.executable, [sys.executable, "-I", "/proc/self/fd/%d" % args.rollback,
                                      "--script", state["script"], "--handoff", str(fd),
                                      "--rollback", str(args.rollback)] + state["argv"])
        raise
    os.close(fd)
    if args.rollback is not None:
        os.close(args.rollback)
    os.environ.pop("RESPAWN_ROLLED_BACK", None)
    resume_identity(sup)
    sup.install_signals()
    sup.setup_file_watch()
    ops_start(sup, state.get("ops") or {"notify": None})
    sup.watcher.close_inherited()     # pidfds of children nobody claimed (none, as a rule)
    took = (monotonic() - state.get("t0", monotonic())) * 1000
    old = (state.get("hash") or "?")[:12]
    if sup.rejected_hash == state.get("new_hash") and sup.hash != state.get("new_hash"):
        sup.log("error", "rolled back to %s: the new code failed to restore" % old)
    else:
        sup.log("info", "re-executed: version %s (%s) -> %s (%s), %s, handoff took %.1f ms"
                % (state.get("version"), old, __version__, (sup.hash or "?")[:12],
                   plural(len(sup.services), "service"), took))
    set_process_title(sup)
    sup.watcher.sweep()
    for signum in state.get("pending", ()):
        sup.timers.at(0, sup.on_signal, signum)
    sup.resume_clients(state)
    if state["fds"].get("client") is not None:
        client = ControlClient(sup, socket.socket(fileno=state["fds"]["client"]))
        client.closing = True
        client.reply({"ok": sup.rejected_hash != state.get("new_hash") or sup.hash == state.get("new_hash"),
                      "pid": os.getpid(), "version": __version__, "hash": sup.hash,
                      "handoff_ms": round(took, 1),
                      "error": None if sup.hash == state.get("new_hash") else "rolled back"})
    sup.check_all_done()
    sup.selector.settle()
    # What we claimed is made close-on-exec again (systemd's rule, research F11)
    # once the loop turns: nothing execs before (every spawn closes what it does
    # not pass), and at 5000 services it is 15 000 syscalls
    claimed.discard(fd)
    claimed.discard(args.rollback)
    sup.timers.at(0, _cloexec, claimed)
    if source is not None:
        sup.timers.at(0, source.pack)
    del state, claimed                # the parsed state: megabytes at 5000 services
    gc.enable()
    return supervise(sup)


def _cloexec(fds):
    for fd in fds:
        try:
            os.set_inheritable(fd, False)
        except (OSError, TypeError):
            pass                      # closed meanwhile (a pipe at its end), or None


def _close_strays(claimed):
    """Whatever the old image left open by mistake is closed: the ranges between
    the fds we claim (close_range on 3.10+, no scan of /proc/self/fd)."""
    low = 3
    for fd in sorted(c for c in claimed if c is not None and c >= 3):
        if fd > low:
            os.closerange(low, fd)
        low = fd + 1
    try:
        limit = os.sysconf("SC_OPEN_MAX")
    except (OSError, ValueError):
        limit = -1
    if 0 < limit - low <= 1 << 16 or sys.version_info >= (3, 10) and limit > low:
        os.closerange(low, limit)
        return
    # a huge limit on a Python whose closerange closes fd by fd: look instead
    try:
        names = os.listdir("/proc/self/fd")
    except OSError:
        names = []
    for name in names:
        if int(name) >= low:
            try:
                os.close(int(name))
            except OSError:
                pass


def cmd_check(args, config_path):
    try:
        config = load_config(config_path, machine_checks=not args.trial)
    except ConfigErrors as exc:
        print_problems(exc, sys.stdout)
        return EXIT_CONFIG
    for w in config.warnings:
        print("%s: %s: %s" % (str(w).split(": ", 1)[0], w.level, w.message))
    if not args.trial:
        print("%s: ok, %s" % (config.path, plural(len(config.programs), "service")))
    return EXIT_OK


def _header_lines(text, header):
    """Where header begins a line (after blanks only): each place it could be one."""
    found, at = [], text.find(header)
    while at >= 0:
        if not text[text.rfind("\n", 0, at) + 1:at].strip():
            found.append(at)
        at = text.find(header, at + 1)
    return found


def config_socket(config_path):
    """[respawn] socket as load_config reads it, or None (not set).  Only that
    section is parsed when the file has one [respawn] (at the start of its line)
    and no [include]: a client that found no supervisor through the lock does
    not read 5000 program sections (~300 ms) to say that nothing answers.  A
    file of any other shape is read in full, as `check` reads it.  (One
    difference: a line elsewhere that makes `check` drop the whole file does not
    hide this socket, where a 1.0.0 supervisor running the last good file listens.)"""
    value = _respawn_section_socket(config_path)
    if value is not False:
        return value
    try:
        return load_config(config_path).settings["socket"]
    except ConfigErrors as exc:
        # a mistake elsewhere in the file does not hide the socket: the operator
        # who is editing the config must still reach the supervisor, which runs
        # the last good one (and `reload` then answers with the lines of `check`)
        return (exc.settings or {}).get("socket")


def _respawn_section_socket(config_path):
    """config_socket from the [respawn] section alone; False when the file's
    shape needs the full read."""
    try:
        text = _read_text(config_path)
    except (OSError, UnicodeDecodeError):
        return False
    if "\r" in text:
        text = text.replace("\r\n", "\n").replace("\r", "\n")
    headers = _header_lines(text, "[respawn]")
    if "\0" in text or len(headers) > 1 or _header_lines(text, "[include]"):
        return False
    if not headers:
        return None
    start = headers[0]
    if start > 0 and text[start - 1] != "\n":
        return False              # indented: it could be a line of a value
    # the section ends at the next line that begins with "[", if that is a header
    after = text.find("\n[", start)
    end = text.find("\n", after + 1) if after >= 0 else -1
    supervisord = "[supervisord]" in text and bool(_SUPERVISORD_HEADER.search(text))
    found, problems = _parse_ini(text[start:] if end < 0 else text[start:end], supervisord)
    if problems or not found or found[0][0] != "respawn" or len(found) != (1 if after < 0 else 2):
        return False
    value = found[0][2].get("socket")
    if value is None:
        return None
    here = os.path.dirname(os.path.abspath(config_path))
    if supervisord:               # as _Loader.load puts it in
        value = value.replace("%(here)s", here)
    return _interpolate(value, {"here": here}, lambda message: None)


def client_socket(config_path):
    """The running supervisor's socket: where its lock file says it listens,
    whatever the config says now (an edit of `socket =` not yet reloaded), in any
    environment (the lock's folder does not move with $XDG_RUNTIME_DIR).  With no
    supervisor holding the lock, the config's socket: a 1.0.0 supervisor (its lock
    beside its socket) listens there, and the error names it."""
    running = running_socket(config_path)
    if running:
        return running
    return config_socket(config_path) or default_socket(config_path)


def cmd_client(args, config_path):
    path = client_socket(config_path)
    cmd = args.command
    payload = {"names": args.names}
    if cmd == "signal":
        payload["signal"] = args.sig
    if cmd == "log":
        payload = {"name": args.name, "n": args.n, "follow": args.follow}
        if args.stderr:
            payload["stream"] = "stderr"
    if cmd == "metrics":
        return cmd_metrics(path)
    if cmd == "status":
        return cmd_status(path, args)
    answers = request(path, cmd, payload)
    try:
        first = next(answers)
    except StopIteration:
        return client_error("the supervisor closed the connection without answering", args.json)
    if not first.get("ok"):
        if first.get("results") and cmd != "signal":     # signal's results are plain booleans
            print_results(first["results"])
        # a rejected reload: the lines of `check`, then what became of the reload
        lines = (first.get("errors") or []) + ([first["error"]] if first.get("error") else [])
        if not lines and first.get("results"):
            return EXIT_FAIL                  # each failure has had its line
        return client_error("\n".join(lines or ["the supervisor refused: %r" % first]), args.json)
    if cmd in ("start", "stop", "restart"):
        print_results(first["results"])
    elif cmd == "signal":
        print("\n".join("%s: signalled" % n for n in first["results"]))
    elif cmd == "reload":
        ch = first["changes"]
        print("; ".join("%s: %s" % (k, ", ".join(v)) for k, v in ch.items() if v and k != "unchanged")
              or "no change")
    elif cmd == "reexec":
        print("re-executed: pid %s, version %s (%s), handoff %s ms" % (
            first["pid"], first["version"], (first.get("hash") or "?")[:12], first.get("handoff_ms")))
    elif cmd == "log":
        stream = "stderr" if args.stderr else None
        if stream and first.get("stream") != stream:
            return client_error("the running supervisor is older and cannot show stderr alone; "
                                "`respawn.py reexec` brings it up to date")
        for line in first["lines"]:
            print(line)
        sys.stdout.flush()
        if args.follow:
            return follow_log(path, args.name, answers, stream)
    elif cmd == "shutdown":
        for _ in answers:
            pass
        print("stopped")
    return EXIT_OK


def cmd_status(path, args):
    """`status [--json]`.  This release's supervisor answers a line with its own
    keys, how many services follow and whether all are ok, then one line per
    service (serve_status): --json prints those lines as they came, once their
    count is checked (decoding and encoding them again was 30 ms at 5000
    services; the bytes are copied as few times as can be, each copy of 1.6 MB
    costing a fresh process about a millisecond).  An older supervisor (1.0.0,
    or the old image of a re-exec answering before the exec) ignores "lines"
    and answers one object, which is decoded and its services encoded again:
    the same text."""
    # status must answer promptly (it is a liveness probe): 30 s, then exit 1
    data = request_whole(path, "status", {"names": args.names, "lines": True}, timeout=30.0)
    end = data.find(b"\n")
    if end < 0:                 # no line ended: nothing was answered
        return client_error("the supervisor closed the connection without answering", args.json)
    first = json.loads(data[:end].decode())
    if first.get("ok") and "services" not in first and type(first.get("lines")) is int:
        count, all_ok = first.pop("lines"), first.pop("all_ok", True)
        got = data.count(b"\n", end + 1)             # whole lines after the first
        if got < count:
            return client_error("the supervisor's answer was cut short (%d of %d services)"
                                % (got, count), args.json)
        if got > count or not data.endswith(b"\n"):
            return client_error("the supervisor's answer has more than the %d services it counts"
                                % count, args.json)
        services, decoded = data[end + 1:-1].replace(b"\n", b",\n    "), None
    elif "services" in first:
        decoded = first.pop("services")
        all_ok = all(s.get("ok", True) for s in decoded)
        services = ",\n    ".join(map(json.dumps, decoded)).encode() if args.json else None
    else:
        return client_error(first.get("error") or "the supervisor refused: %r" % first, args.json)
    first.pop("ok", None)
    if args.json:
        if not write_stdout(format_status_json(dict({"schema": first.pop("schema", STATUS_SCHEMA)}, **first),
                                               services)):
            return EXIT_FAIL
    else:
        if decoded is None:
            decoded = json.loads(b"[" + services + b"]")
        if decoded:
            print(format_status(decoded))
    return EXIT_OK if all_ok else EXIT_NOT_RUNNING


def cmd_metrics(path):
    """`metrics`: the exposition on stdout.  With no supervisor, still a valid
    exposition (respawn_supervisor_up 0) and exit 1: a textfile collector fed by
    cron then shows the supervisor down instead of its last numbers."""
    try:
        first = next(request(path, "metrics", {}, timeout=30.0), {})
    except (NoSupervisor, socket.timeout, OSError) as exc:
        sys.stdout.write(format_metrics(None, up=False))
        sys.stderr.write("%s\n" % (exc if isinstance(exc, NoSupervisor)
                                    else "the supervisor did not answer: %s" % exc))
        return EXIT_FAIL
    if not first.get("ok"):
        sys.stdout.write(format_metrics(None, up=False))
        sys.stderr.write("%s\n" % (first.get("error") or "the supervisor gave no metrics"))
        return EXIT_FAIL
    sys.stdout.write(first["text"])
    return EXIT_OK


def follow_log(path, name, answers, stream=None):
    while True:
        reconnect = False
        for msg in answers:
            if "line" in msg:
                print(msg["line"], flush=True)
            elif msg.get("event") == "reexec":
                reconnect = True
        if not reconnect:
            return EXIT_OK
        deadline = monotonic() + 30
        while True:      # the new image answers once it is up; the socket is kept
            try:
                answers = request(path, "log", {"name": name, "n": 0, "follow": True, "stream": stream})
                next(answers)
                break
            except (NoSupervisor, StopIteration, OSError):
                if monotonic() > deadline:
                    return client_error("lost the supervisor while following %s's log" % name)
                selectors.select.select([], [], [], 0.1)


def print_results(results):
    """One line per service: what it became on stdout, a failure on stderr."""
    for name, r in results.items():
        if r.get("ok"):
            print("%s: %s" % (name, r.get("state", "ok")))
        else:
            sys.stdout.flush()
            sys.stderr.write("%s: ERROR (%s%s)\n" % (
                name, r.get("state"), ": %s" % r["reason"] if r.get("reason") else ""))
            sys.stderr.flush()


HELP = """\
usage: respawn.py [-c FILE] [COMMAND [ARGS]]

A process supervisor in one file.

commands:
  run [--daemon]               supervise in the foreground (the default);
                               --daemon detaches and logs to the logfile
  check                        validate the config; exit 0 or 2
  status [NAME...] [--json]    show services; exit 3 if one that should run does not
  start|stop|restart NAME...   start, stop or restart services (or all)
  signal SIG NAME...           send a signal to services
  reload                       re-read the config and apply the difference (= SIGHUP)
  reexec                       re-execute the supervisor, services untouched (= SIGUSR2)
  log NAME [-n N] [-f] [--stderr]
                               show a service's recent output (-n lines, default 20);
                               -f, --follow keeps printing new lines; --stderr: stderr alone
  shutdown                     stop every service, then the supervisor (= SIGTERM)
  metrics                      print Prometheus metrics (text exposition format)
  help [COMMAND]               this help, or one command's (also COMMAND --help)

options:
  -c, --config FILE            config file (default: $RESPAWN_CONFIG, ./respawn.ini,
                               respawn.ini beside this script, /etc/respawn.ini)
  --version                    print the version and exit
  -h, --help                   print this help and exit

Errors go to stderr; with --json also {"error": ...} on stdout.  Exit codes:
0 ok, 1 failed (or no supervisor answers), 2 config or command-line mistake,
3 (status) a service that should run does not.
Signals: TERM/INT stop everything, HUP reloads, USR2 re-executes, USR1 reopens logs.
"""

# One command's usage: `help COMMAND` and `COMMAND --help`
COMMAND_HELP = {
    "run": ("run [--daemon]", """\
Supervise the config's services until TERM/INT (the default command).  A
second run on the same config prints "already running (pid N)" and exits 0.
Exit 0 after a clean stop, 2 on a config error (nothing is started).""",
            "--daemon    detach (double fork, setsid); the supervisor's log and the\n"
            "            services' prefixed output go to [respawn] logfile, else\n"
            "            LOGDIR/NAME.log; prints the pid and that path"),
    "check": ("check", """\
Validate the config without running it: every problem at once, each at its
file and line.  Exit 0 when it would run, 2 otherwise.""", None),
    "status": ("status [NAME...] [--json]", """\
One line per service: name, state, restart count, then pid and uptime or the
last exit and why.  Exit 0; 3 when a service that should run does not (autostart
or started by the operator, now FATAL, BACKOFF, STOPPED, or EXITED with an
unexpected code), the NAMEs only when given; 1 when no supervisor answers.""",
               "--json      one JSON object, schema in the README (\"schema\": %d);\n"
               "            an error is {\"error\": \"...\"} on stdout as well" % STATUS_SCHEMA),
    "start": ("start NAME...|all", """\
Start services and wait until each has settled.  One line per service; exit 1
if one did not start (its line on stderr).""", None),
    "stop": ("stop NAME...|all", """\
Stop services (stopsignal, then SIGKILL after stopwaitsecs) and wait until
they are gone.  They stay stopped until started again.""", None),
    "restart": ("restart NAME...|all", """\
Stop then start services, waiting for each.  Exit 1 if one did not start.""", None),
    "signal": ("signal SIG NAME...|all", """\
Send a signal (HUP, USR1, 15...) to each service's main process.  Exit 1 if
one is not running.""", None),
    "reload": ("reload", """\
Re-read the config and apply the difference (= SIGHUP): new services start,
removed ones stop, changed ones restart, the others are not touched.  A config
with errors is rejected with the lines of `check`, exit 1, nothing changes.""", None),
    "reexec": ("reexec", """\
Re-execute the supervisor from respawn.py on disk (= SIGUSR2), services
untouched; prints the handoff time.  A file that fails its check is refused.""", None),
    "log": ("log NAME [-n N] [-f] [--stderr]", """\
A service's recent output, from where its stdout goes: its stdout_logfile, or
the last 500 lines kept in memory (with its stderr lines, as they came, unless
stderr has a file of its own).  A service whose stdout is not kept
(stdout_logfile = none) shows its stderr.  -f follows both streams.""",
            "-n N          the last N lines (default 20)\n"
            "-f, --follow  then keep printing new lines, across re-execs\n"
            "--stderr      the stderr alone (its stderr_logfile, or its lines in memory)"),
    "shutdown": ("shutdown", """\
Stop every service (reverse start order), then the supervisor (= SIGTERM).""", None),
    "metrics": ("metrics", """\
The Prometheus text exposition of the supervisor and its services, on stdout
(for node_exporter's textfile collector).  With no supervisor answering it
prints respawn_supervisor_up 0 and exits 1.  [respawn] metrics = HOST:PORT
serves the same at GET /metrics.""", None),
    "help": ("help [COMMAND]", "The commands, or one command's usage.", None),
}


def command_help(command):
    """The usage of one command, or the whole help."""
    if command not in COMMAND_HELP:
        return HELP
    synopsis, text, options = COMMAND_HELP[command]
    out = "usage: respawn.py [-c FILE] %s\n\n%s\n" % (synopsis, text)
    if options:
        out += "\noptions:\n" + "".join("  %s\n" % line for line in options.splitlines())
    return out + "\nrespawn.py --help lists every command.\n"


# command: (least, most) arguments, and its own options (name: takes a value)
COMMANDS = {
    "run": ((0, 0), {"--daemon": False}),
    "check": ((0, 0), {"--trial": False}),
    "status": ((0, None), {"--json": False}),
    "start": ((1, None), {}), "stop": ((1, None), {}), "restart": ((1, None), {}),
    "signal": ((2, None), {}),
    "reload": ((0, 0), {}), "reexec": ((0, 0), {}), "shutdown": ((0, 0), {}),
    "log": ((1, 1), {"-n": True, "-f": False, "--follow": False, "--stderr": False}),
    "help": ((0, 1), {}),
    "metrics": ((0, 0), {}),
}
# options of every command; the --handoff family is how the supervisor calls itself
GLOBAL_OPTIONS = {"-c": True, "--config": True, "-h": False, "--help": False, "--version": False,
                  "--handoff": True, "--rollback": True, "--script": True,
                  "--handoff-selftest": True}


class UsageError(Exception):
    pass


def suggest_command(word):
    """' (did you mean ...?)': a command the word begins (stat: status, not start),
    else the closest one."""
    starts = [c for c in COMMANDS if c.startswith(word)]
    return " (did you mean %r?)" % starts[0] if len(starts) == 1 else did_you_mean(word, COMMANDS)


def parse_args(argv):
    """The command line of SPEC.md, as a namespace.  Made by hand: argparse and
    what it imports (gettext; shutil with bz2 and lzma on 3.8) would stay in a
    supervisor's memory for its whole life, about 3 MiB."""
    import types
    args = types.SimpleNamespace(
        config=None, handoff=None, rollback=None, script=None, handoff_selftest=None,
        command=None, daemon=False, trial=False, json=False, names=[], sig=None, name=None,
        n=20, follow=False, stderr=False, help=False, topic=None)
    words, positional = list(argv), []
    while words:
        word = words.pop(0)
        if word == "--":
            positional += words
            break
        if not word.startswith("-") or word == "-":
            if args.command is None and not positional:
                if word not in COMMANDS:
                    raise UsageError("unknown command %r%s" % (word, suggest_command(word)))
                args.command = word
            else:
                positional.append(word)
            continue
        known = dict(GLOBAL_OPTIONS, **COMMANDS.get(args.command, (None, {}))[1])
        option, value = word, None
        if word.startswith("--") and "=" in word:
            option, value = word.split("=", 1)
        elif not word.startswith("--") and len(word) > 2:
            option, value = word[:2], word[2:]
        if option not in known and option.startswith("--"):
            matches = [o for o in known if o.startswith(option)]
            option = matches[0] if len(matches) == 1 else option
        if option not in known:
            raise UsageError("unknown option %s%s%s" % (
                option, " for %s" % args.command if args.command else "", did_you_mean(option, known)))
        if known[option]:
            if value is None:
                if not words:
                    raise UsageError("%s needs a value" % option)
                value = words.pop(0)
        elif value is not None:
            raise UsageError("%s takes no value" % option)
        if option == "--version":
            print("respawn.py " + __version__)
            sys.exit(EXIT_OK)
        attr = {"-c": "config", "-n": "n", "-f": "follow", "-h": "help"}.get(
            option, option[2:].replace("-", "_"))
        if option in ("-n", "--handoff", "--rollback"):
            # ASCII digits: int() also takes '٣', ' 5' and '1_0'
            if not re.match(r"-?[0-9]{1,30}\Z", value):
                raise UsageError("%s takes a number, not %s" % (option, _cut(value)))
            value = int(value)
            if value < 0:
                raise UsageError("%s takes a number of 0 or more, not %d" % (option, value))
            if option == "-n" and value > MAX_LOG_LINES:
                raise UsageError("-n takes a number up to %d, not %d" % (MAX_LOG_LINES, value))
        setattr(args, attr, True if value is None else value)
    if args.help or args.command == "help":
        # `COMMAND --help` and `help COMMAND`: that command's usage; its arguments
        # are not checked (`stop --help` needs no name)
        topic = positional[0] if args.command == "help" and positional else args.command
        if args.command == "help" and len(positional) > 1:
            raise UsageError("help takes one command, not %s" % " ".join(positional))
        if topic is not None and topic not in COMMANDS:
            raise UsageError("unknown command %r%s" % (topic, suggest_command(topic)))
        args.command, args.topic = "help", None if topic == "help" else topic
        return args
    args.command = args.command or "run"
    (least, most), _ = COMMANDS[args.command]
    if len(positional) < least:
        raise UsageError("%s needs %s" % (args.command, {
            "signal": "a signal and one or more service names (or all)",
            "log": "a service name"}.get(args.command, "one or more service names (or all)")))
    if most is not None and len(positional) > most:
        raise UsageError("%s takes %s, not %s" % (
            args.command, "one service name" if most else "no arguments", " ".join(positional)))
    if args.command == "signal":
        args.sig, positional = positional[0], positional[1:]
    if args.command == "log":
        args.name = positional[0]
    args.names = positional
    return args


def main(argv=None, code=None):
    """The command line.  `code`, this module's own code object, is given only
    when this file runs as a script: `run` then restarts through LOADER."""
    words = sys.argv[1:] if argv is None else argv
    try:
        args = parse_args(words)
    except UsageError as exc:
        return client_error("respawn.py: %s; respawn.py --help lists the commands" % exc,
                            "--json" in words, EXIT_CONFIG)
    command = args.command
    if command == "help":
        sys.stdout.write(command_help(args.topic))
        return EXIT_OK
    script = os.path.realpath(args.script or __file__)
    loaded = "_LOADED_SOURCE" in globals()
    source = globals().pop("_LOADED_SOURCE", None)      # kept compressed (Packed), not twice
    # only a supervisor and a trial keep their source (a client compressing 370 KB
    # for nothing spent 11 ms of every command)
    keeps_source = command == "run" or args.handoff is not None or args.handoff_selftest
    try:
        if source is None and keeps_source:
            with open("/proc/self/fd/%d" % args.rollback if args.rollback is not None and args.script
                      else script, "rb") as f:
                source = f.read()
    except OSError:
        source = None
    if (code is not None and source is not None and command == "run" and args.handoff is None
            and not args.handoff_selftest and not loaded and sys.executable):
        # costs one interpreter start (~20 ms) and saves ~7 MiB for the supervisor's life
        argv, fd = loader_argv(code, source, [script] + sys.argv[1:])
        try:
            os.execv(sys.executable, argv)
        except OSError:
            os.close(fd)
    # compressed from here on: this frame lives as long as the supervisor.  The
    # loader ran the code compiled from this very source: a re-exec to the same
    # bytes runs it again instead of compiling the file (~100 ms at 8000 lines)
    # (packed now only for a supervisor that starts here: a handoff packs once its
    # loop turns, and a trial never keeps it)
    source = Packed(source, code if loaded else None, now=command == "run" and args.handoff is None
                    and not args.handoff_selftest) if source and keeps_source else None
    if args.handoff is not None:
        return resume(args, script, source)
    if args.handoff_selftest:
        gc.disable()                  # as in resume: many objects, none garbage, and we exit soon
        try:
            with open(args.handoff_selftest, "rb") as f:
                state = load_handoff(f.read())
            Supervisor(handoff_load_config(state), state["script"], state["argv"], source).restore_data(state)
        except ConfigErrors as exc:
            print_problems(exc, sys.stdout)
            return EXIT_CONFIG
        except Exception as exc:   # the trial reports any failure as one line
            print("the new code cannot restore the running state: %s: %s" % (type(exc).__name__, exc))
            return EXIT_FAIL
        # the config that counts is the one in effect, carried in the state: an
        # edit on disk that was never reloaded must not block an upgrade
        return EXIT_OK
    try:
        config_path = os.path.abspath(find_config(args.config))
    except NoConfig as exc:
        # nothing to run, and no supervisor to ask: a config mistake for run and
        # check, "nobody answers" (exit 1) for a client
        return client_error(str(exc), args.json, EXIT_CONFIG if command in ("run", "check") else EXIT_FAIL)
    try:
        if command == "run":
            return cmd_run(args, config_path, script, source)
        if command == "check":
            return cmd_check(args, config_path)
        try:
            return cmd_client(args, config_path)
        except NoSupervisor as exc:
            return client_error(str(exc), args.json)
        except socket.timeout:
            return client_error("the supervisor did not answer in time (it may be stopped or overloaded)",
                                args.json)
        except ValueError:       # a reply that is not JSON: not our supervisor on that socket
            return client_error("the supervisor's answer is not JSON (is respawn.py listening on %s?)"
                                % client_socket(config_path), args.json)
        except OSError as exc:
            if isinstance(exc, BrokenPipeError):
                raise
            # a socket path too long for AF_UNIX, a reset mid-answer...
            return client_error("cannot talk to the supervisor on %s: %s"
                                % (client_socket(config_path), exc.strerror or exc), args.json)
    except KeyboardInterrupt:
        return EXIT_FAIL
    except BrokenPipeError:
        return EXIT_FAIL


if __name__ == "__main__":
    sys.exit(main(code=sys._getframe().f_code))

