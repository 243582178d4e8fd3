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

Reading order: helpers, config, service policy, processes, output, event
loop, supervisor, control socket and client, re-execution, command line.
"""

__version__ = "1.0.0"

import errno
import fcntl
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
# Nor are argparse, hashlib, random or shutil imported at all (see parse_args,
# sha256, uniform, which): each would stay in a supervisor's memory for its life.

# ---------------------------------------------------------------------------
# Constants and small helpers
# ---------------------------------------------------------------------------

STOPPED, STARTING, RUNNING, BACKOFF, STOPPING, EXITED, FATAL = (
    "STOPPED", "STARTING", "RUNNING", "BACKOFF", "STOPPING", "EXITED", "FATAL")

EXIT_OK, EXIT_FAIL, EXIT_CONFIG, EXIT_NOT_RUNNING = 0, 1, 2, 3
PROTOCOL = 1                      # control-socket protocol version
HANDOFF_FORMAT = 1                # re-exec state format version
READ_SIZE = 1 << 20               # one read from a service pipe
MAX_PARTIAL = 64 * 1024           # a longer line without newline is cut here
TAIL_LINES = 500                  # lines kept in memory per service for `log`
MAX_REQUEST = 64 * 1024           # control-socket request size limit
CLIENT_TIMEOUT = 10.0             # a client must send its request within this
HANDLED_SIGNALS = ("SIGTERM", "SIGINT", "SIGQUIT", "SIGHUP", "SIGUSR1", "SIGUSR2", "SIGCHLD")
# supervisord program keys respawn does not implement: a warning, not an error,
# so that a supervisord [program:x] section runs unchanged.
SUPERVISORD_KEYS = {
    "process_name", "numprocs", "numprocs_start", "serverurl", "stdout_capture_maxbytes",
    "stdout_events_enabled", "stdout_syslog", "stderr_capture_maxbytes",
    "stderr_events_enabled", "stderr_syslog", "nice"}
SUPERVISORD_SECTIONS = ("supervisord", "supervisorctl", "unix_http_server",
                        "inet_http_server", "rpcinterface:", "group:", "eventlistener:",
                        "fcgi-program:")


def monotonic():
    return time.monotonic()


def did_you_mean(word, choices):
    import difflib  # only on the error path
    close = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.6)
    return " (did you mean %r?)" % close[0] if close else ""


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
    if text.isdigit():
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


def describe_exit(status):
    if status is None:
        return "not started"
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
    """A mistake in a config file: shown to the user as one line, FILE:LINE: what."""

    def __init__(self, message, file=None, line=None):
        super().__init__(message)
        self.message, self.file, self.line = message, file, line

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


_DURATION = re.compile(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*(ms|s|m|h|d)?\s*\Z", re.I)
_DURATION_UNITS = {None: 1.0, "ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
_SIZE = re.compile(r"\s*(\d+)\s*(b|kb|mb|gb)?\s*\Z", re.I)
_SIZE_UNITS = {None: 1, "b": 1, "kb": 1024, "mb": 1024 ** 2, "gb": 1024 ** 3}
_BOOLS = {"true": True, "yes": True, "on": True, "1": True,
          "false": False, "no": False, "off": False, "0": False}


def parse_duration(text):
    m = _DURATION.match(text)
    if not m:
        raise ValueError("expected a duration such as 10, 0.5, 500ms, 2s or 1m, not %r" % text)
    return float(m.group(1)) * _DURATION_UNITS[(m.group(2) or "").lower() or None]


def parse_size(text):
    m = _SIZE.match(text)
    if not m:
        raise ValueError("expected a size such as 1024, 10KB, 50MB or 1GB, not %r" % text)
    return int(m.group(1)) * _SIZE_UNITS[(m.group(2) or "").lower() or None]


def parse_bool(text):
    try:
        return _BOOLS[text.strip().lower()]
    except KeyError:
        raise ValueError("expected true or false, not %r" % text) from None


def parse_int(text):
    try:
        return int(text.strip())
    except ValueError:
        raise ValueError("expected a whole number, not %r" % text) from None


def parse_signal(text):
    try:
        return signal_number(text)
    except ValueError:
        raise ValueError("expected a signal name such as TERM, INT, HUP, QUIT or KILL, not %r"
                         % text) from None


def parse_exitcodes(text):
    codes = set()
    for part in text.split(","):
        part = part.strip()
        if not part.isdigit() or int(part) > 255:
            raise ValueError("expected exit codes 0-255 separated by commas, not %r" % text)
        codes.add(int(part))
    return frozenset(codes)


def parse_autorestart(text):
    value = text.strip().lower()
    if value == "unexpected":
        return "unexpected"
    try:
        return parse_bool(value)
    except ValueError:
        raise ValueError("expected true, false or unexpected, not %r" % text) from None


def parse_startretries(text):
    if text.strip().lower() == "forever":
        return None
    try:
        value = parse_int(text)
    except ValueError:
        value = -1            # one message for every bad value, naming `forever` too
    if value < 0:
        raise ValueError("expected a number of retries (0 or more) or forever, not %r" % text)
    return value


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
    try:
        value = int(text.strip(), 8)
    except ValueError:
        raise ValueError("expected an octal umask such as 022, not %r" % text) from None
    if not 0 <= value <= 0o777:
        raise ValueError("expected an octal umask between 000 and 777, not %r" % text)
    return value


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
            raise ValueError('expected KEY="value" pairs separated by commas, not %r' % item.strip())
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
        if sep2 and port.isdigit() and 0 < int(port) < 65536:
            return ("tcp", (host, int(port)))
        raise ValueError("expected tcp:HOST:PORT with a port 1-65535, not %r" % text)
    raise ValueError("expected %s, not %r" % (kinds, text))


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
        raise ValueError("expected one of %s, not %r" % (", ".join(LOG_LEVELS), text))
    return value


def parse_log_format(text):
    value = text.strip().lower()
    if value not in ("text", "json"):
        raise ValueError("expected text or json, not %r" % text)
    return value


LOG_LEVELS = {"debug": 10, "info": 20, "warn": 30, "warning": 30, "error": 40, "critical": 50}

# key: (parser, default).  The defaults are the SPEC's.
RESPAWN_KEYS = {
    "socket": (str, None),
    "logfile": (str, None),
    "loglevel": (parse_loglevel, "info"),
    "pidfile": (str, None),
    "logdir": (str, None),
    "watch_self": (parse_bool, True),
    "watch_config": (parse_bool, False),
    "exit_on_fatal": (parse_bool, False),
    "subreaper": (parse_bool, False),
    "log_format": (parse_log_format, "text"),
}

PROGRAM_KEYS = {
    "command": (parse_command, None),
    "directory": (str, None),
    "environment": (parse_environment, {}),
    "user": (str, None),
    "group": (str, None),
    "umask": (parse_umask, None),
    "autostart": (parse_bool, True),
    "autorestart": (parse_autorestart, True),
    "exitcodes": (parse_exitcodes, frozenset([0])),
    "startsecs": (parse_duration, 1.0),
    "startretries": (parse_startretries, 3),
    "backoff": (parse_duration, 1.0),
    "backoff_max": (parse_duration, 60.0),
    "stopsignal": (parse_signal, signal.SIGTERM),
    "stopwaitsecs": (parse_duration, 10.0),
    "stopasgroup": (parse_bool, True),
    "killasgroup": (parse_bool, True),
    "stdout_logfile": (parse_logfile, None),
    "stdout_logfile_maxbytes": (parse_size, 50 * 1024 ** 2),
    "stdout_logfile_backups": (parse_int, 10),
    "redirect_stderr": (parse_bool, False),
    "stderr_logfile": (parse_logfile, None),
    "stderr_logfile_maxbytes": (parse_size, 50 * 1024 ** 2),
    "stderr_logfile_backups": (parse_int, 10),
    "priority": (parse_int, 999),
    "requires": (parse_list, ()),
    "ready": (lambda t: parse_probe(t, True), ("none", None)),
    "ready_timeout": (parse_duration, 60.0),
    "healthcheck": (lambda t: parse_probe(t, False), None),
    "healthcheck_interval": (parse_duration, 10.0),
    "healthcheck_failures": (parse_int, 3),
    "watchdog": (parse_duration, 0.0),
}
PROGRAM_DEFAULTS = {key: default for key, (_, default) in PROGRAM_KEYS.items()}

# Keys that shape the running process: a change to one of them restarts the
# service on reload.  Everything else is policy, applied to the running process.
PROCESS_KEYS = ("command", "directory", "environment", "user", "group", "umask", "redirect_stderr")


class Program:
    """One [program:NAME] section, typed.  Plain data; `raw` keeps the text for diffs."""

    def __init__(self, name, values, raw, file=None, line=None):
        self.__dict__.update(PROGRAM_DEFAULTS)
        self.__dict__.update(values)
        self.name, self.raw, self.file, self.line = name, raw, file, line

    def shape(self):
        """What a reload compares to decide whether the process must restart."""
        pipes = tuple(self.stream_target(s) == "none" for s in ("stdout", "stderr"))
        notify = self.ready[0] == "notify"
        return (tuple(self.raw.get(k) for k in PROCESS_KEYS), pipes, notify,
                self.watchdog if notify else 0)

    def stream_target(self, stream):
        """'prefix' (the supervisor's own stdout/stderr), 'none', or a file path or 'auto'."""
        if stream == "stderr" and self.redirect_stderr:
            return "merged"
        target = getattr(self, stream + "_logfile")
        return "prefix" if target is None else target


class Config:
    """A whole config: the [respawn] settings, programs, and the text of every file read."""

    def __init__(self, path, settings, programs, files, warnings, sections=()):
        self.path, self.settings, self.programs = path, settings, programs
        self.files, self.warnings = files, warnings
        # [file, name, line, {key: text}] for every section as read: a re-exec hands
        # them over, so the new image types them without parsing the INI again
        self.sections = sections

    def digest(self):
        h = sha256()
        for path in sorted(self.files):
            h.update(path.encode() + b"\0" + self.files[path].encode() + b"\0")
        return h.hexdigest()


_SECTION_LINE, _KEY_LINE = re.compile(r"\[(.+)\]"), re.compile(r"([^=:]+?)\s*[=:]")


def _scan_lines(text):
    """Line numbers of sections and keys: configparser does not keep them."""
    where, section = {}, None
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip() or line.lstrip()[:1] in ("#", ";") or line[:1].isspace():
            continue
        m = _SECTION_LINE.match(line.strip())
        if m:
            section = m.group(1)
            where.setdefault((section, None), number)
            continue
        m = _KEY_LINE.match(line)
        if m and section is not None:
            where.setdefault((section, m.group(1).strip().lower()), number)
    return where


_INTERPOLATION = re.compile(r"%\(([^)]*)\)([sd])|%%|%")


def _interpolate(value, names, fail):
    """supervisord's %(ENV_X)s, %(here)s, %(program_name)s expansions."""
    def repl(m):
        if m.group(0) == "%%":
            return "%"
        if m.group(0) == "%":
            return "%"
        name = m.group(1)
        if name.startswith("ENV_") and name[4:] in os.environ:
            return os.environ[name[4:]]
        if name in names:
            return str(names[name])
        fail("unknown expansion %%(%s)s (expected ENV_NAME, here, program_name, "
             "process_num or group_name)" % name)
        return m.group(0)
    return _INTERPOLATION.sub(repl, value) if "%" in value else value


def _read_text(path):
    with open(path, encoding="utf-8") as f:
        return f.read()


class _Loader:
    """Reads a config and its includes; collects every error before giving up."""

    def __init__(self, read):
        self.read = read
        self.errors, self.warnings = [], []
        self.files = {}          # path -> text, in reading order
        self.sections = []       # (file, line numbers, section name, {key: value})

    def error(self, message, file=None, line=None):
        self.errors.append(ConfigError(message, file, line))

    def load(self, path, stack=(), line=None):
        """line: of the [include] files key that named this file, for errors."""
        path = os.path.abspath(path)
        if path in stack:
            chain = " -> ".join(os.path.basename(p) for p in stack + (path,))
            self.error("include loop: %s" % chain, stack[-1] if stack else path, line)
            return
        try:
            text = self.read(path)
        except (OSError, UnicodeDecodeError) as exc:
            reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
            self.error("cannot read the config: %s" % reason, stack[-1] if stack else path, line)
            return
        self.files[path] = text
        import configparser
        parser = configparser.RawConfigParser(
            strict=True, inline_comment_prefixes=(";",), default_section="\0",
            empty_lines_in_values=False)
        try:
            parser.read_string(text, source=path)
        except configparser.DuplicateSectionError as exc:
            self.error("section [%s] appears twice (keep one)" % exc.section, path, exc.lineno)
            return
        except configparser.DuplicateOptionError as exc:
            self.error("key %r appears twice in [%s] (keep one)" % (exc.option, exc.section),
                       path, exc.lineno)
            return
        except configparser.MissingSectionHeaderError as exc:
            self.error("a key outside any section: %r (put it under [respawn] or "
                       "[program:NAME])" % exc.line.strip(), path, exc.lineno)
            return
        except configparser.ParsingError as exc:
            source = text.splitlines()
            for lineno, line in exc.errors:
                # configparser keeps repr(line), newline escape and all: show the line itself
                if 0 < lineno <= len(source):
                    line = repr(source[lineno - 1].strip())
                self.error("cannot read this line: %s (expected key = value or [section])"
                           % line, path, lineno)
            return
        lines = _scan_lines(text)
        for name in parser.sections():
            values = dict(parser.items(name))
            self.sections.append((path, lines, name, values))
            if name == "include":
                for key in values:
                    if key != "files":
                        self.error("unknown key %r in [include]%s" % (key, did_you_mean(key, ["files"])),
                                   path, lines.get((name, key)))
                here = os.path.dirname(path)
                for pattern in parse_list(values.get("files", "")):
                    pattern = os.path.join(here, os.path.expanduser(pattern))
                    import glob
                    for found in sorted(glob.glob(pattern)):
                        self.load(found, stack + (path,), lines.get((name, "files")))


# The form of Config.sections in a handoff state: a new image that reads them
# otherwise parses the carried config text instead.
SECTIONS_FORMAT = 1


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
        loader.sections = [(file, {(name, None): line}, name, values)
                           for file, name, line, values in carried["sections"]]
    err = loader.error
    settings = {k: d for k, (_, d) in RESPAWN_KEYS.items()}
    programs = {}
    seen_respawn = None
    for file, lines, name, values in loader.sections:
        here = os.path.dirname(file)
        sline = lines.get((name, None))
        if name == "include":
            continue
        if name == "respawn":
            if seen_respawn:
                err("[respawn] is already defined in %s (keep one)" % seen_respawn, file, sline)
                continue
            seen_respawn = file
            table, target = RESPAWN_KEYS, settings
            names = {"here": here}
        elif name.startswith("program:"):
            pname = name[len("program:"):].strip()
            if not re.match(r"[A-Za-z0-9_.@-]+\Z", pname):
                err("program name %r may hold only letters, digits and _ . @ -" % pname, file, sline)
                continue
            if pname in programs:
                other = programs[pname]
                err("[program:%s] is already defined at %s:%s" % (pname, other.file, other.line),
                    file, sline)
                continue
            table, target = PROGRAM_KEYS, {}
            names = {"here": here, "program_name": pname, "group_name": pname, "process_num": 0}
        elif name.startswith(SUPERVISORD_SECTIONS):
            loader.warnings.append(ConfigError(
                "[%s] is a supervisord section that respawn does not use; ignored" % name,
                file, sline))
            continue
        else:
            choices = ["respawn", "include", "program:" + name.split(":")[-1]]
            err("unknown section [%s]%s" % (name, did_you_mean(name, choices)
                                             or " (expected [respawn], [include] or [program:NAME])"),
                file, sline)
            continue
        raw = {}
        for key, text in values.items():
            kline = lines.get((name, key))
            if key not in table:
                if table is PROGRAM_KEYS and key in SUPERVISORD_KEYS:
                    loader.warnings.append(ConfigError(
                        "%r is a supervisord key that respawn does not implement; ignored" % key,
                        file, kline))
                    continue
                err("unknown key %r in [%s]%s" % (key, name, did_you_mean(key, table)), file, kline)
                continue
            text = _interpolate(text, names, lambda m: err(m, file, kline))
            raw[key] = text
            try:
                target[key] = table[key][0](text)
            except ValueError as exc:
                err("%s: %s" % (key, exc), file, kline)
        if table is PROGRAM_KEYS:
            if "command" not in raw:
                err("[%s] has no command (add command = /path/to/program args)" % name, file, sline)
                continue
            programs[pname] = Program(pname, target, raw, file, sline)
    config_file = os.path.abspath(path)
    for prog in programs.values():
        _check_program(prog, programs, err, loader.warnings)
    _check_requires(programs, err)
    if machine_checks and not loader.errors:
        for prog in programs.values():
            problem = machine_problem(prog)
            if problem:
                err("[program:%s] %s" % (prog.name, problem), prog.file, prog.line)
    if loader.errors:
        exc = ConfigErrors(loader.errors, loader.warnings)
        exc.settings = settings
        raise exc
    return Config(config_file, settings, programs, loader.files, loader.warnings,
                  [[file, name, lines.get((name, None)), values] for file, lines, name, values in loader.sections])


def _check_program(prog, programs, err, warnings):
    where = (prog.file, prog.line)
    if prog.backoff <= 0 or prog.backoff_max < prog.backoff:
        err("[program:%s] backoff must be > 0 and backoff_max >= backoff" % prog.name, *where)
    if prog.healthcheck_failures < 1:
        err("[program:%s] healthcheck_failures must be 1 or more" % prog.name, *where)
    if prog.healthcheck_interval <= 0:
        err("[program:%s] healthcheck_interval must be more than 0" % prog.name, *where)
    if prog.watchdog and prog.ready[0] != "notify":
        err("[program:%s] watchdog needs ready = notify (the service sends WATCHDOG=1)"
            % prog.name, *where)
    for stream in ("stdout", "stderr"):
        if getattr(prog, stream + "_logfile_backups") < 0:
            err("[program:%s] %s_logfile_backups must be 0 or more" % (prog.name, stream), *where)
    for req in prog.requires:
        if req == prog.name:
            err("[program:%s] requires itself" % prog.name, *where)
        elif req not in programs:
            err("[program:%s] requires %r, which is not a program%s"
                % (prog.name, req, did_you_mean(req, programs)), *where)
        elif programs[req].priority > prog.priority:
            warnings.append(ConfigError(
                "[program:%s] (priority %d) requires %s (priority %d): requires wins, %s starts "
                "first" % (prog.name, prog.priority, req, programs[req].priority, req), *where))


def _check_requires(programs, err):
    """A cycle in requires is an error naming the services on it."""
    state = {}

    def visit(name, path):
        state[name] = "open"
        for req in programs[name].requires:
            if req not in programs or req == name:
                continue
            if state.get(req) == "open":
                cycle = path[path.index(req):] + [req]
                prog = programs[name]
                err("requires cycle: %s" % " -> ".join(cycle), prog.file, prog.line)
            elif req not in state:
                visit(req, path + [req])
        state[name] = "done"

    for name in programs:
        if name not in state:
            visit(name, [name])


def resolve_user(prog):
    """(uid, gid, groups, home, username) for a program's user/group, or None; KeyError if unknown."""
    import grp
    import pwd
    if not prog.user and not prog.group:
        return None
    if prog.user:
        pw = pwd.getpwuid(int(prog.user)) if prog.user.isdigit() else pwd.getpwnam(prog.user)
        uid, gid, home, name = pw.pw_uid, pw.pw_gid, pw.pw_dir, pw.pw_name
    else:
        uid, gid, home, name = os.getuid(), os.getgid(), None, None
    if prog.group:
        gid = int(prog.group) if prog.group.isdigit() else grp.getgrnam(prog.group).gr_gid
        if prog.group.isdigit():
            grp.getgrgid(gid)
    groups = os.getgrouplist(name, gid) if name else [gid]
    return uid, gid, groups, home, name


def machine_problem(prog):
    """What on this machine stops the program from starting, or None."""
    try:
        resolve_user(prog)
    except KeyError:
        return "unknown user or group %r" % (prog.user or prog.group)
    if prog.directory and not os.path.isdir(prog.directory):
        return "directory %r does not exist" % prog.directory
    exe = prog.command[0]
    if "/" in exe:
        full = os.path.join(prog.directory or os.getcwd(), exe)
        if not os.path.exists(full):
            return "command %r not found" % exe
        if os.path.isdir(full) or not os.access(full, os.X_OK):
            return "command %r is not executable" % exe
    else:
        env_path = prog.environment.get("PATH", os.environ.get("PATH", os.defpath))
        if not which(exe, env_path):
            return "command %r not found in PATH" % exe
    return None


# ---------------------------------------------------------------------------
# Service policy: states and restart decisions, plain data and a given clock
# ---------------------------------------------------------------------------

class Service:
    """One program's life: plain data the policy reads and the handoff carries."""

    # what survives a re-exec, by name; the rest is rebuilt
    CARRIED = ("state", "pid", "started", "started_mono", "failures", "restarts", "exitstatus",
               "reason", "ready", "wanted", "deadline", "stop_then_start", "failing",
               "health_failures", "health_at", "watchdog_at", "status_text", "mainpid",
               "stopping_notified")

    def __init__(self, program):
        self.program = program
        self.name = program.name
        self.state = STOPPED
        self.pid = None
        self.started = None           # wall clock of the last spawn, for status
        self.started_mono = None
        self.failures = 0             # failed starts in a row
        self.restarts = 0             # automatic restarts since the supervisor began
        self.exitstatus = None
        self.reason = "not started"
        self.ready = False
        self.wanted = program.autostart   # should be running (autostart or operator)
        self.deadline = None          # monotonic time of the current state's timer
        self.stop_then_start = False  # a restart in progress
        self.failing = None           # set when we kill a start that failed (ready_timeout)
        self.health_failures = 0
        self.health_at = None
        self.watchdog_at = None
        self.status_text = None       # STATUS= from sd_notify
        self.mainpid = None           # MAINPID= from sd_notify
        self.stopping_notified = False
        self.removed = False          # removed by a reload, stopping before it is forgotten
        # not carried: rebuilt after a re-exec
        self.timer = self.health_timer = self.watchdog_timer = None
        self.notify = None
        self.probe = None
        self.health_probe = None
        self.tail = None

    def alive(self):
        return self.pid is not None

    def uptime(self, now):
        return now - self.started_mono if self.started_mono is not None else 0.0


def backoff_delay(program, failures, rand=uniform):
    """Delay before the next start after `failures` failed starts in a row:
    d = min(backoff_max, backoff * 2**(n-1)), drawn uniformly from [d/2, d]."""
    d = min(program.backoff_max, program.backoff * 2 ** min(failures - 1, 64))
    return d / 2 + rand() * d / 2


def decide_exit(svc, status, now, rand=uniform):
    """The policy for a process that exited by itself (not stopped by us).

    Returns (state, delay): RUNNING with delay 0 means start again at once,
    BACKOFF with the delay before the next start, or EXITED / FATAL."""
    prog = svc.program
    svc.exitstatus = status
    expected = status in prog.exitcodes
    restart_wanted = prog.autorestart is True or (prog.autorestart == "unexpected" and not expected)
    started_ok = (svc.failing is None and svc.state in (RUNNING, STOPPING)
                  and svc.uptime(now) >= prog.startsecs)
    if started_ok:
        svc.failures = 0
        if restart_wanted:
            return RUNNING, 0.0
        return EXITED, None
    if not restart_wanted and expected and svc.failing is None:
        return EXITED, None       # a one-shot that finished as expected, however fast
    svc.failures += 1
    if prog.startretries is not None and svc.failures > prog.startretries:
        return FATAL, None
    return BACKOFF, backoff_delay(prog, svc.failures, rand)


def should_be_running(svc):
    """For `status` exit code 3: a wanted service that is not running as it should."""
    if not svc.wanted:
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
    """Order a stop: each wave is a list of names signalled together.  Reverse
    priority, level by level, and a service always stops before what it requires."""
    alive = set(names)
    waves = []
    while alive:
        required = {r for o in alive for r in services[o].program.requires if r != o}
        free = [n for n in alive if n not in required]
        if not free:              # cannot happen with a validated config; do not hang
            free = list(alive)
        top = max(services[n].program.priority for n in free)
        wave = sorted(n for n in free if services[n].program.priority == top)
        waves.append(wave)
        alive.difference_update(wave)
    return waves


# ---------------------------------------------------------------------------
# Processes: spawn, signal, watch
# ---------------------------------------------------------------------------

class SpawnError(Exception):
    """A service could not be started: missing command, directory, user..."""


def _child_setup(umask, ids):
    """preexec_fn for Python 3.8, where Popen lacks user=, group= and umask=."""
    def setup():
        if umask is not None:
            os.umask(umask)
        if ids:
            uid, gid, groups = ids
            os.setgroups(groups)
            os.setgid(gid)
            os.setuid(uid)
    return setup


def spawn(prog, stdout, stderr, extra_env=None):
    """Start a program's process in its own session and process group; its pid.

    stdout/stderr are fds (or subprocess.DEVNULL).  The child starts clean:
    the supervisor keeps its own mask empty and no signal ignored but the two
    Python ignores itself, which restore_signals puts back (research F25)."""
    import subprocess
    env = None        # our own environment, as the kernel has it: nothing to copy or encode
    if prog.environment or extra_env:
        env = dict(os.environ)
        env.update(prog.environment)
    ids = None
    try:
        who = resolve_user(prog)
    except KeyError:
        raise SpawnError("unknown user or group %r" % (prog.user or prog.group)) from None
    if who:
        uid, gid, groups, home, name = who
        if name:
            # supervisord leaves the supervisor's HOME and USER: a classic surprise
            env = dict(os.environ) if env is None else env
            env.update(HOME=home, USER=name, LOGNAME=name)
        if os.geteuid() == 0:
            ids = (uid, gid, groups)
        elif uid != os.geteuid():
            raise SpawnError("user %r needs the supervisor to run as root" % prog.user)
    if extra_env:
        env.update(extra_env)
    kwargs = dict(stdin=subprocess.DEVNULL, stdout=stdout, stderr=stderr, cwd=prog.directory,
                  env=env, start_new_session=True, close_fds=True, restore_signals=True)
    if sys.version_info >= (3, 9):
        if ids:
            kwargs.update(user=ids[0], group=ids[1], extra_groups=ids[2])
        if prog.umask is not None:
            kwargs["umask"] = prog.umask
    elif ids or prog.umask is not None:
        kwargs["preexec_fn"] = _child_setup(prog.umask, ids)
    try:
        proc = subprocess.Popen(list(prog.command), **kwargs)
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

    def __init__(self, selector, reap_orphans):
        self.selector = selector
        self.reap_orphans = reap_orphans
        self.callbacks = {}       # pid -> callback(pid, exitstatus)

    def watch(self, pid, callback):
        raise NotImplementedError

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

    def watch(self, pid, callback):
        self.callbacks[pid] = callback

    def sigchld(self):
        self._reap_others()


class PidfdWatcher(ChildWatcher):
    """Each child's pidfd sits in the selector: its exit wakes the loop at once."""

    def __init__(self, selector, reap_orphans):
        super().__init__(selector, reap_orphans)
        self.pidfds = {}          # pid -> fd
        self.needs_sigchld = reap_orphans

    def watch(self, pid, callback):
        try:
            fd = os.pidfd_open(pid)
        except ProcessLookupError:
            # already reaped (cannot happen for our own child): report a lost status
            callback(pid, None)
            return
        self.callbacks[pid] = callback
        self.pidfds[pid] = fd
        self.selector.register(fd, selectors.EVENT_READ, lambda mask, pid=pid: self._ready(pid))

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
            else:
                try:
                    os.waitpid(info.si_pid, os.WNOHANG)
                except ChildProcessError:
                    pass
                self._dispatch(info.si_pid, None)

    def sweep(self):
        for pid in list(self.pidfds):
            self._ready(pid)
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

class LogFile:
    """A service log file, appended as the service wrote it, rotated by size
    at a line boundary, reopened on SIGUSR1 (logrotate)."""

    def __init__(self, path, maxbytes, backups):
        self.path, self.maxbytes, self.backups = path, maxbytes, backups
        self.fd = None
        self.open()

    def open(self):
        dirname = os.path.dirname(self.path)
        if dirname:
            os.makedirs(dirname, exist_ok=True)
        self.fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o644)
        self.size = os.fstat(self.fd).st_size
        self.at_line_start = True

    def reopen(self):
        self.close()
        self.open()

    def close(self):
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None

    def write(self, data):
        # One read can hold megabytes: cut it into whole lines that fit, and
        # rotate only between lines, so that no line is split across two files
        # and only a single line longer than maxbytes makes a file bigger.
        while data:
            if not self.maxbytes or self.size + len(data) <= self.maxbytes:
                self._write(data)
                return
            cut = data.rfind(b"\n", 0, max(0, self.maxbytes - self.size)) + 1
            if not cut:
                if self.size and self.at_line_start:
                    self.rotate()
                    continue
                cut = data.find(b"\n") + 1 or len(data)   # end the line begun in this file
            self._write(data[:cut])
            data = data[cut:]

    def _write(self, data):
        write_all(self.fd, data)
        self.size += len(data)
        self.at_line_start = data.endswith(b"\n")

    def rotate(self):
        self.close()
        for n in range(self.backups - 1, 0, -1):
            older = "%s.%d" % (self.path, n)
            if os.path.exists(older):
                os.replace(older, "%s.%d" % (self.path, n + 1))
        try:
            if self.backups > 0:
                os.replace(self.path, self.path + ".1")
            else:
                os.unlink(self.path)
        except FileNotFoundError:
            pass      # renamed away (logrotate before its SIGUSR1): start a new file anyway
        self.open()


class Pipe:
    """The read end of one service stream, and the partial line read so far."""

    __slots__ = ("fd", "service", "stream", "partial", "carried")

    def __init__(self, fd, service, stream, partial=b""):
        self.fd, self.service, self.stream, self.partial = fd, service, stream, partial
        self.carried = 0              # bytes read; -2 once grown, -1 if it could not be


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


# ---------------------------------------------------------------------------
# Event loop: timers, signals, the supervisor and its handlers
# ---------------------------------------------------------------------------

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
        return max(0.0, self.heap[0][0] - now) if self.heap else None

    def run_due(self, now):
        while self.heap and self.heap[0][0] <= now:
            when, _, callback, args = heapq.heappop(self.heap)
            if callback is not None:
                callback(*args)


def default_runtime_dir():
    if os.environ.get("XDG_RUNTIME_DIR"):
        return os.path.join(os.environ["XDG_RUNTIME_DIR"], "respawn")
    if os.geteuid() == 0:
        return "/run/respawn"
    return "/tmp/respawn-%d" % os.geteuid()


def default_socket(config_path):
    path = os.path.abspath(config_path)
    name = os.path.basename(path)
    if name.endswith(".ini"):
        name = name[:-4]
    digest = sha256(path.encode()).hexdigest()[:8]
    return os.path.join(default_runtime_dir(), "%s-%s.sock" % (name, digest))


def default_logdir():
    if os.geteuid() == 0:
        return "/var/log/respawn"
    base = os.environ.get("XDG_STATE_HOME") or os.path.expanduser("~/.local/state")
    return os.path.join(base, "respawn")


def socket_path(config):
    return config.settings["socket"] or default_socket(config.path)


def make_private_dir(path):
    """The socket's folder: created 0700, and refused if someone else can write to it."""
    os.makedirs(path, mode=0o700, exist_ok=True)
    st = os.stat(path)
    if st.st_uid != os.geteuid():
        raise OSError(errno.EPERM, "%s belongs to uid %d, not to us" % (path, st.st_uid))
    if st.st_mode & 0o077:
        os.chmod(path, 0o700)


class Supervisor:
    """Holds the services and runs the loop: wait for events, dispatch, repeat."""

    def __init__(self, config, script, argv, source=None):
        self.config = config
        self.script = script                  # absolute, resolved at start-up
        self.argv = argv                      # our command line, without handoff options
        self.source = source                  # bytes of the code now running
        self.hash = sha256(source).hexdigest() if source else None
        self.rejected_hash = None
        self.selector = selectors.DefaultSelector()
        self.timers = Timers()
        self.services = {name: Service(p) for name, p in config.programs.items()}
        self.pipes = {}                       # fd -> Pipe
        self.grown_pipes = 0                  # pipes enlarged by grow_pipe
        self.sinks = {}                       # (service name, stream) -> LogFile
        self.started = time.time()
        self.reexecs = 0
        self.pid1 = os.getpid() == 1
        self.reaper = self.pid1 or config.settings["subreaper"]
        self.watcher = make_watcher(self.selector, self.reaper)
        self.done = False
        self.exit_code = EXIT_OK
        self.shutting_down = False
        self.waves = []                       # stop waves still to run
        self.after_waves = None
        self.wave_begun = None                # the wave already signalled (advance_waves)
        self.waiters = []                     # control clients waiting for states
        self.followers = {}                   # service name -> [client] for `log -f`
        self.clients = {}                     # fd -> ControlClient
        self.listener = None
        self.lock_fd = None
        self.log_fd = 2
        self.notify_parent = None             # $NOTIFY_SOCKET of systemd, for READY=1
        self.file_watch = None
        self.reexec_busy = False
        self.reexec_client = None
        self.reexec_code = None               # (hash, code object, source) the trial checked
        self.signals_due = []                 # drained from the wakeup fd, not yet handled
        self.maybe_waiting = True             # a service may wait for what it requires
        self.helpers = {}                     # pid -> purpose, for trial checks and probes
        self.shutdown_clients = []            # told when the supervisor has stopped
        self.reexeced = None                  # wall time of the last re-exec
        self.pidfile = None
        self.apply_settings()

    # -- logging ----------------------------------------------------------

    def apply_settings(self):
        s = self.config.settings
        self.loglevel = LOG_LEVELS[s["loglevel"]]
        self.json_logs = s["log_format"] == "json"
        self.reopen_log()

    def reopen_log(self):
        path = self.config.settings["logfile"]
        new = 2
        if path:
            try:
                os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
                new = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o644)
            except OSError as exc:
                self.log("error", "cannot open logfile %s: %s; logging to stderr" % (path, exc.strerror))
        if self.log_fd != 2:
            os.close(self.log_fd)
        self.log_fd = new

    def log(self, level, message, service=None):
        if LOG_LEVELS[level] < self.loglevel:
            return
        now = time.time()
        if self.json_logs:
            line = json.dumps({"time": round(now, 3), "service": service, "stream": "supervisor",
                               "level": level, "message": message}) + "\n"
        else:
            stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(now))
            line = "%s.%03d %-5s %s%s\n" % (stamp, int(now * 1000) % 1000, level.upper(),
                                             (service + ": ") if service else "", message)
        write_all(self.log_fd, line.encode("utf-8", "replace"))

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
            self.reopen_log()
            for sink in self.sinks.values():
                sink.reopen()
        elif signum == signal.SIGUSR2:
            self.request_reexec("SIGUSR2")

    # -- starting ---------------------------------------------------------

    def start_all(self):
        """Start every wanted service: ascending priority, requires waits for readiness."""
        for svc in sorted(self.services.values(), key=lambda s: (s.program.priority, s.name)):
            if svc.wanted and not svc.alive() and svc.state not in (BACKOFF,):
                self.start(svc)

    def start(self, svc):
        if svc.alive() or self.shutting_down:
            return
        svc.wanted = True
        self.timers.cancel(svc.timer)
        blockers = start_blockers(svc, self.services)
        if blockers:
            self.maybe_waiting = True
            if svc.reason != "waiting for " + ", ".join(blockers):
                svc.reason = "waiting for " + ", ".join(blockers)
                self.log("info", svc.reason, svc.name)
            self.set_state(svc, STOPPED)
            return
        self.spawn(svc)

    def spawn(self, svc):
        prog = svc.program
        now = monotonic()
        svc.failing = None
        svc.ready = False
        svc.stopping_notified = False
        svc.status_text = svc.mainpid = None
        svc.health_failures = 0
        fds = []
        import subprocess
        try:
            out_w = err_w = subprocess.DEVNULL
            streams = {}
            for stream in ("stdout", "stderr"):
                target = prog.stream_target(stream)
                if target in ("none", "merged"):
                    continue
                r, w = os.pipe()
                fds += [r, w]
                streams[stream] = r
                if stream == "stdout":
                    out_w = w
                else:
                    err_w = w
            if prog.stream_target("stderr") == "merged":
                err_w = out_w if out_w != subprocess.DEVNULL else subprocess.STDOUT
            extra = {}
            if prog.ready[0] == "notify":
                extra["NOTIFY_SOCKET"] = self.notify_socket(svc)
                if prog.watchdog:
                    extra["WATCHDOG_USEC"] = str(int(prog.watchdog * 1e6))
            pid = spawn(prog, out_w, err_w, extra)
        except (SpawnError, OSError) as exc:
            for fd in fds:
                os.close(fd)
            message = str(exc) if isinstance(exc, SpawnError) else "cannot start: %s" % exc
            self.log("error", message, svc.name)
            svc.started_mono = now
            svc.state = STARTING
            self.after_exit(svc, None, reason=message)
            return
        for fd in fds[1::2]:
            os.close(fd)
        for stream, r in streams.items():
            self.add_pipe(Pipe(r, svc.name, stream))
        svc.pid = pid
        svc.started = time.time()
        svc.started_mono = now
        svc.reason = ""
        self.watcher.watch(pid, lambda pid, status, svc=svc: self.on_child_exit(pid, status, svc))
        import shlex
        self.log("info", "started pid %d: %s" % (pid, shlex.join(prog.command)), svc.name)
        self.set_state(svc, STARTING)
        self.arm_start_timers(svc, now)

    def arm_start_timers(self, svc, now):
        prog = svc.program
        if prog.ready[0] == "none":
            if prog.startsecs <= 0:
                self.became_ready(svc)
            else:
                self.arm(svc, svc.started_mono + prog.startsecs, self.became_ready)
        else:
            self.arm(svc, svc.started_mono + prog.ready_timeout, self.ready_timeout)
            if prog.ready[0] in ("tcp", "exec"):
                self.schedule_probe(svc, now, ready=True)

    def arm(self, svc, when, callback):
        self.timers.cancel(svc.timer)
        svc.deadline = when
        svc.timer = self.timers.at(when, callback, svc) if when is not None else None

    def became_ready(self, svc):
        if svc.state != STARTING or not svc.alive():
            return
        svc.ready = True
        self.cancel_checks(svc)
        self.arm(svc, None, None)
        self.set_state(svc, RUNNING)
        self.log("info", "running (pid %d)" % svc.pid, svc.name)
        self.arm_liveness(svc)
        self.start_waiting()

    def start_waiting(self):
        # called each time a service becomes ready: sorting every service each time
        # made starting 500 of them quadratic, so only those waiting are looked at
        if not self.maybe_waiting:
            return
        waiting = lambda s: s.wanted and s.state == STOPPED and s.reason.startswith("waiting for")
        found = [s for s in self.services.values() if waiting(s)]
        self.maybe_waiting = bool(found)
        for other in sorted(found, key=lambda s: (s.program.priority, s.name)):
            if waiting(other):
                self.start(other)

    def ready_timeout(self, svc):
        if svc.state != STARTING:
            return
        svc.failing = "not ready within %gs" % svc.program.ready_timeout
        self.log("warn", svc.failing, svc.name)
        self.stop(svc, svc.failing)

    # -- exits and the policy ---------------------------------------------

    def on_child_exit(self, pid, status, svc):
        if svc.pid != pid:
            return
        self.drain_service_pipes(svc)
        if svc.program.killasgroup:
            kill_group_or_pid(pid, signal.SIGKILL, True)   # no grandchild outlives its service
        svc.pid = None
        self.after_exit(svc, status)

    def after_exit(self, svc, status, reason=None):
        now = monotonic()
        self.cancel_checks(svc)
        svc.ready = False
        svc.exitstatus = status
        how = reason or describe_exit(status)
        if svc.state == STOPPING and svc.failing is None:
            self.arm(svc, None, None)
            svc.reason = svc.reason or "stopped"
            self.log("info", "stopped (%s)" % describe_exit(status), svc.name)
            self.set_state(svc, STOPPED)
            if svc.removed:
                self.forget_service(svc)
            elif svc.stop_then_start and not self.shutting_down:
                why, svc.stop_then_start = svc.stop_then_start, False
                svc.restarts += 1
                self.start(svc)
                if svc.alive() and isinstance(why, str):
                    svc.reason = why          # a health or watchdog restart says why in status
            self.advance_waves()
            return
        if self.shutting_down or not svc.wanted:
            self.arm(svc, None, None)
            svc.reason = how
            self.set_state(svc, EXITED)
            self.advance_waves()
            return
        if svc.failing:
            how = svc.failing
        if svc.stopping_notified:                  # STOPPING=1: the service said it would exit
            svc.state = RUNNING
            svc.started_mono = min(svc.started_mono, now - svc.program.startsecs)
        state, delay = decide_exit(svc, status, now)
        svc.failing = None
        self.arm(svc, None, None)
        if state == RUNNING:
            self.log("info", "%s after %s; restarting" % (how, fmt_duration(svc.uptime(now))),
                     svc.name)
            svc.restarts += 1
            # through start(): a restart waits, as a first start does, for what it requires
            self.start(svc)
            if svc.alive():
                svc.reason = how              # status says why it was restarted
        elif state == BACKOFF:
            svc.reason = how
            self.log("warn", "%s: failed start %d, retrying in %.2fs"
                     % (how, svc.failures, delay), svc.name)
            self.set_state(svc, BACKOFF)
            self.arm(svc, now + delay, self.backoff_over)
        elif state == FATAL:
            svc.reason = "%s; gave up after %d failed starts" % (how, svc.failures)
            self.log("error", svc.reason, svc.name)
            self.set_state(svc, FATAL)
            if self.config.settings["exit_on_fatal"]:
                self.log("error", "exit_on_fatal: stopping everything")
                self.exit_code = EXIT_FAIL
                self.shutdown()
        else:
            svc.reason = how
            self.log("info", "exited (%s)" % how, svc.name)
            self.set_state(svc, EXITED)
        self.check_all_done()

    def backoff_over(self, svc):
        if svc.state == BACKOFF and svc.wanted and not self.shutting_down:
            svc.restarts += 1
            self.start(svc)

    def check_all_done(self):
        """Container mode: nothing runs and nothing will: exit, 0 only if all succeeded."""
        if not (self.pid1 or self.config.settings["exit_on_fatal"]) or self.shutting_down:
            return
        svcs = list(self.services.values())
        if not svcs or any(s.alive() or s.state in (BACKOFF, STARTING, STOPPING)
                           or (s.wanted and s.state == STOPPED) for s in svcs):
            return
        ok = all(s.state != FATAL and (s.state != EXITED or s.exitstatus in s.program.exitcodes)
                 for s in svcs)
        self.log("info", "every service has exited; exiting %s" % ("0" if ok else "1"))
        self.exit_code = EXIT_OK if ok else EXIT_FAIL
        self.shutdown()

    def set_state(self, svc, state):
        svc.state = state
        if self.waiters:
            self.check_waiters()

    # -- stopping ---------------------------------------------------------

    def stop(self, svc, reason="stopped"):
        """Stop one service: stopsignal, then SIGKILL after stopwaitsecs."""
        self.timers.cancel(svc.timer)
        if not svc.alive():
            if svc.state in (BACKOFF, STARTING) or svc.reason.startswith("waiting"):
                svc.reason = reason
                self.set_state(svc, STOPPED)
            return
        if svc.state == STOPPING:
            return
        svc.reason = reason
        prog = svc.program
        self.cancel_checks(svc)
        self.log("info", "stopping (%s, %s)" % (reason, signal_name(prog.stopsignal)), svc.name)
        self.set_state(svc, STOPPING)
        kill_group_or_pid(svc.pid, prog.stopsignal, prog.stopasgroup)
        if prog.stopsignal not in (signal.SIGKILL, signal.SIGCONT):
            kill_group_or_pid(svc.pid, signal.SIGCONT, prog.stopasgroup)   # a stopped process must wake to die
        self.arm(svc, monotonic() + prog.stopwaitsecs, self.stop_timeout)

    def stop_timeout(self, svc):
        if svc.state == STOPPING and svc.alive():
            try:
                os.kill(svc.pid, 0)
            except ProcessLookupError:
                # reaped (by us: nobody else can) but its exit never reached the
                # policy, which only a bug in a handler can do: gone, not waited on forever
                self.log("error", "pid %d is gone but its exit was not handled" % svc.pid, svc.name)
                svc.pid = None
                self.after_exit(svc, None, "gone")
                return
            except OSError:
                pass
            self.log("warn", "still alive after %gs: SIGKILL" % svc.program.stopwaitsecs, svc.name)
            kill_group_or_pid(svc.pid, signal.SIGKILL, svc.program.killasgroup)
            svc.deadline = None

    def stop_many(self, names, then=None):
        """Stop services wave by wave (reverse priority, dependants first)."""
        self.waves.extend(stop_waves([n for n in names if n in self.services], self.services))
        if then:
            self.after_waves = then
        self.advance_waves()

    def advance_waves(self):
        while self.waves:
            wave = [n for n in self.waves[0] if n in self.services]
            # A wave is signalled once, then waited on until none of it is STOPPING:
            # signalling again would stop a service that a restart has just started,
            # and a STARTING process must be stopped, not marked STOPPED while alive.
            if self.wave_begun is not self.waves[0]:
                self.wave_begun = self.waves[0]
                for name in wave:
                    svc = self.services[name]
                    if not svc.alive() and (svc.state in (BACKOFF, STARTING)
                                            or (svc.state == STOPPED and svc.wanted)):
                        self.timers.cancel(svc.timer)
                        svc.reason = "stopped"
                        self.set_state(svc, STOPPED)
                    elif svc.alive() and svc.state != STOPPING:
                        self.stop(svc)
            if any(self.services[n].alive() and self.services[n].state == STOPPING for n in wave):
                return
            self.waves.pop(0)
        if self.after_waves:
            then, self.after_waves = self.after_waves, None
            then()

    def shutdown(self):
        if self.shutting_down:
            return
        self.shutting_down = True
        for svc in self.services.values():
            svc.wanted = False
        self.waves = []
        self.stop_many(list(self.services), then=self.finish)

    def finish(self):
        if not any(s.alive() for s in self.services.values()):
            self.log("info", "every service is stopped; exiting")
            self.done = True

    def forget_service(self, svc):
        self.services.pop(svc.name, None)
        self.close_notify(svc)
        for stream in ("stdout", "stderr"):
            sink = self.sinks.pop((svc.name, stream), None)
            if sink:
                sink.close()

    # -- output -----------------------------------------------------------

    def add_pipe(self, pipe):
        os.set_blocking(pipe.fd, False)
        self.pipes[pipe.fd] = pipe
        self.selector.register(pipe.fd, selectors.EVENT_READ, lambda mask, p=pipe: self.on_pipe(p))

    def on_pipe(self, pipe):
        try:
            data = os.read(pipe.fd, READ_SIZE)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if data:
            if pipe.carried >= 0:
                # grown once the stream has carried 1 MiB: deterministic, unlike
                # waiting for a read that happens to find the pipe full
                pipe.carried += len(data)
                if pipe.carried > 1 << 20:
                    pipe.carried = -1
                    if self.grown_pipes < GROWN_PIPES_MAX and grow_pipe(pipe.fd):
                        self.grown_pipes += 1
                        pipe.carried = -2
            self.emit(pipe, data)
        else:
            self.close_pipe(pipe)

    def drain_service_pipes(self, svc):
        """Read what a service wrote before it exited, so its last lines come first."""
        self.drain_pipes([p for p in self.pipes.values() if p.service == svc.name])

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
            prog = svc.program
            path = target
            if target == "auto":
                path = os.path.join(self.config.settings["logdir"] or default_logdir(),
                                    "%s-%s.log" % (name, stream))
            try:
                sink = LogFile(path, getattr(prog, stream + "_logfile_maxbytes"),
                               getattr(prog, stream + "_logfile_backups"))
            except OSError as exc:
                self.log("error", "cannot open %s: %s; writing to the supervisor's %s"
                         % (path, exc.strerror, stream), name)
                return None
            self.sinks[(name, stream)] = sink
        return sink

    def emit(self, pipe, data, final=False):
        name, stream = pipe.service, pipe.stream
        sink = self.sink_for(name, stream)
        if sink is not None and not self.followers.get(name):
            if pipe.partial:
                data, pipe.partial = pipe.partial + data, b""
            sink.write(data)
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
            sink.write(data)
        lines = data.decode("utf-8", "replace").split("\n")[:-1]
        svc = self.services.get(name)
        if svc is not None and sink is None:
            if svc.tail is None:
                from collections import deque
                svc.tail = deque(maxlen=TAIL_LINES)
            svc.tail.extend(lines)
        for client in self.followers.get(name, ()):
            client.send_lines(lines)
        if sink is None:
            self.write_prefixed(name, stream, lines)

    def write_prefixed(self, name, stream, lines):
        fd = 2 if stream == "stderr" else 1
        if self.json_logs:
            now = round(time.time(), 3)
            out = "".join(json.dumps({"time": now, "service": name, "stream": stream,
                                      "message": line}) + "\n" for line in lines)
        else:
            prefix = name + " | "
            out = "".join(prefix + line + "\n" for line in lines)
        write_all(fd, out.encode("utf-8", "replace"))

    # -- readiness and liveness probes ----------------------------------------

    def schedule_probe(self, svc, now, ready):
        spec = svc.program.ready if ready else svc.program.healthcheck
        interval = 0.1 if ready else svc.program.healthcheck_interval
        timeout = min(5.0, svc.program.ready_timeout) if ready else svc.program.healthcheck_interval
        if ready:
            svc.probe = ["wait", self.timers.at(now + (0.05 if spec[0] == "tcp" else 0.1),
                                                self.run_probe, svc, spec, ready, timeout, interval)]
        else:
            svc.health_at = now + interval
            svc.health_timer = self.timers.at(svc.health_at, self.run_probe, svc, spec, ready,
                                              timeout, interval)

    def run_probe(self, svc, spec, ready, timeout, interval):
        if not svc.alive() or (ready and svc.state != STARTING) or (not ready and svc.state != RUNNING):
            return
        done = lambda ok, why=None: self.probe_done(svc, ready, ok, why, interval)
        handle = Probe(self, svc, spec, timeout, done)
        if ready:
            svc.probe = handle
        else:
            svc.health_probe = handle
        handle.start()

    def probe_done(self, svc, ready, ok, why, interval):
        if ready:
            svc.probe = None
            if ok:
                self.became_ready(svc)
            elif svc.state == STARTING and svc.alive():
                svc.probe = ["wait", self.timers.at(monotonic() + interval, self.run_probe, svc,
                                                    svc.program.ready, True,
                                                    min(5.0, svc.program.ready_timeout), interval)]
            return
        svc.health_probe = None
        if svc.state != RUNNING or not svc.alive():
            return
        if ok:
            svc.health_failures = 0
        else:
            svc.health_failures += 1
            self.log("warn", "healthcheck failed (%d/%d): %s" % (
                svc.health_failures, svc.program.healthcheck_failures, why), svc.name)
            if svc.health_failures >= svc.program.healthcheck_failures:
                self.restart_for(svc, "healthcheck failed %d times: %s" % (svc.health_failures, why))
                return
        self.schedule_probe(svc, monotonic(), ready=False)

    def cancel_checks(self, svc):
        """Stop every readiness and liveness check of a service: probes in flight,
        the next health probe, the watchdog deadline."""
        self.timers.cancel(svc.health_timer)
        self.timers.cancel(svc.watchdog_timer)
        for attr in ("probe", "health_probe"):
            handle = getattr(svc, attr)
            if isinstance(handle, list):
                self.timers.cancel(handle[1])
            elif handle is not None:
                handle.cancel()
            setattr(svc, attr, None)

    def arm_liveness(self, svc):
        now = monotonic()
        if svc.program.healthcheck:
            self.schedule_probe(svc, now, ready=False)
        if svc.program.watchdog and svc.program.ready[0] == "notify":
            self.arm_watchdog(svc, now + svc.program.watchdog)

    def arm_watchdog(self, svc, when):
        self.timers.cancel(svc.watchdog_timer)
        svc.watchdog_at = when
        svc.watchdog_timer = self.timers.at(when, self.watchdog_expired, svc)

    def watchdog_expired(self, svc):
        if svc.state == RUNNING and svc.alive():
            self.restart_for(svc, "watchdog: no WATCHDOG=1 for %gs" % svc.program.watchdog)

    def restart_for(self, svc, why):
        self.log("warn", "restarting: %s" % why, svc.name)
        svc.stop_then_start = why         # truthy, and kept for status once restarted
        self.stop(svc, why)
        svc.reason = why

    # -- sd_notify --------------------------------------------------------------

    def notify_socket(self, svc):
        """The service's $NOTIFY_SOCKET: an abstract datagram socket of its own."""
        if svc.notify is None:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
            name = "respawn-%d-%s-%s" % (os.getpid(), svc.name, os.urandom(4).hex())
            sock.bind("\0" + name)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
            sock.setblocking(False)
            self.adopt_notify(svc, sock, "@" + name)
        return svc.notify[1]

    def adopt_notify(self, svc, sock, address):
        svc.notify = (sock, address)
        self.selector.register(sock, selectors.EVENT_READ, lambda mask, s=svc: self.on_notify(s))

    def close_notify(self, svc):
        if svc.notify is not None:
            self.selector.unregister(svc.notify[0])
            svc.notify[0].close()
            svc.notify = None

    def on_notify(self, svc):
        sock = svc.notify[0]
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
            self.on_notify_message(svc, data.decode("utf-8", "replace"))

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

    def on_notify_message(self, svc, text):
        fields = {}
        for line in text.split("\n"):
            key, sep, value = line.partition("=")
            if sep:
                fields[key.strip()] = value
        if "STATUS" in fields:
            svc.status_text = fields["STATUS"]
        if "MAINPID" in fields and fields["MAINPID"].isdigit():
            svc.mainpid = int(fields["MAINPID"])
        if fields.get("STOPPING") == "1":
            svc.stopping_notified = True
        if fields.get("READY") == "1" and svc.state == STARTING:
            self.log("info", "READY=1", svc.name)
            self.became_ready(svc)
        if fields.get("WATCHDOG") == "1" and svc.state == RUNNING and svc.program.watchdog:
            self.arm_watchdog(svc, monotonic() + svc.program.watchdog)
        if fields.get("WATCHDOG") == "trigger" and svc.state == RUNNING:
            self.restart_for(svc, "watchdog triggered by the service")

    # -- reload -----------------------------------------------------------

    def reload(self, client=None):
        """Re-read the config and apply the difference; a bad config changes nothing."""
        try:
            new = load_config(self.config.path)
        except ConfigErrors as exc:
            for e in exc.errors:
                self.log("error", "reload rejected: %s" % e)
            if client:
                client.reply({"ok": False, "error": "config rejected", "errors": [str(e) for e in exc.errors]})
            return
        summary = self.apply_config(new)
        self.log("info", "reloaded %s: %s" % (new.path, ", ".join(
            "%s %s" % (k, ",".join(v)) for k, v in summary.items() if v) or "no change"))
        if client:
            client.reply({"ok": True, "changes": summary})

    def apply_config(self, new):
        old = self.config
        summary = {"added": [], "removed": [], "restarted": [], "updated": [], "unchanged": []}
        self.config = new
        self.apply_settings()
        for name, svc in list(self.services.items()):
            if name not in new.programs:
                summary["removed"].append(name)
                svc.removed = True
                svc.wanted = False
                if svc.alive():
                    self.stop(svc, "removed from the config")
                else:
                    self.timers.cancel(svc.timer)
                    self.forget_service(svc)
        for name, prog in new.programs.items():
            svc = self.services.get(name)
            if svc is None:
                summary["added"].append(name)
                self.services[name] = Service(prog)
                continue
            if svc.removed:
                # removed by an earlier reload and still stopping: back in the config,
                # so it is started again once its old process is gone
                summary["added"].append(name)
                svc.removed = False
                svc.program = prog
                svc.wanted = svc.stop_then_start = prog.autostart
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
            svc.program = prog
            if before.shape() != prog.shape() and svc.alive():
                summary["restarted"].append(name)
                if prog.ready[0] != "notify":
                    self.close_notify(svc)
                svc.stop_then_start = True
                self.stop(svc, "config changed")
            else:
                summary["updated"].append(name)
                if svc.state == RUNNING and (before.healthcheck != prog.healthcheck
                                             or before.watchdog != prog.watchdog):
                    self.cancel_checks(svc)
                    self.arm_liveness(svc)
                if before.autostart != prog.autostart and not svc.alive():
                    svc.wanted = prog.autostart
        for name in summary["added"]:
            if self.services[name].wanted:
                self.start(self.services[name])
        self.start_waiting()
        # watch what the new config asks for (also when nothing was watched before)
        watched = lambda c: (c.settings["watch_self"], c.settings["watch_config"], sorted(c.files))
        if watched(old) != watched(new):
            self.setup_file_watch()
        return summary


class Probe:
    """One readiness or health probe: a non-blocking TCP connect or a command,
    never blocking the loop; calls done(ok, why) once."""

    def __init__(self, sup, svc, spec, timeout, done):
        self.sup, self.svc, self.spec, self.timeout, self.done_cb = sup, svc, spec, timeout, done
        self.sock = self.pid = self.timer = None
        self.finished = False

    def start(self):
        kind, arg = self.spec
        self.timer = self.sup.timers.at(monotonic() + self.timeout, self.finish, False,
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
                self.sup.selector.register(self.sock, selectors.EVENT_WRITE, self.on_connect)
            else:
                self.finish(False, "tcp %s:%d: %s" % (host, port, os.strerror(err)))
        else:
            prog = self.svc.program
            probe_prog = Program(prog.name, dict(vars(prog), command=arg), prog.raw)
            import subprocess
            try:
                self.pid = spawn(probe_prog, subprocess.DEVNULL, subprocess.DEVNULL)
            except SpawnError as exc:
                self.finish(False, str(exc))
                return
            self.sup.helpers[self.pid] = "probe"
            self.sup.watcher.watch(self.pid, self.on_exit)

    def on_connect(self, mask):
        err = self.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        host, port = self.spec[1]
        self.finish(err == 0, "tcp %s:%d: %s" % (host, port, os.strerror(err)))

    def on_exit(self, pid, status):
        self.sup.helpers.pop(pid, None)
        self.pid = None
        self.finish(status == 0, "%s exited with %s" % (self.spec[1][0], describe_exit(status)))

    def cancel(self):
        if not self.finished:
            self.finished = True
            self.cleanup()

    def cleanup(self):
        self.sup.timers.cancel(self.timer)
        if self.sock is not None:
            try:
                self.sup.selector.unregister(self.sock)
            except (KeyError, ValueError):
                pass
            self.sock.close()
            self.sock = None
        if self.pid is not None:
            # still ours to reap: the watcher keeps it, with nobody listening
            kill_group_or_pid(self.pid, signal.SIGKILL, True)
            self.sup.watcher.callbacks[self.pid] = lambda pid, status: self.sup.helpers.pop(pid, None)
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

class ControlClient:
    """One connection to the control socket.  Non-blocking both ways, a bounded
    request, a deadline for it: a slow or hostile client never stalls the loop."""

    def __init__(self, sup, sock):
        self.sup, self.sock = sup, sock
        self.inbuf, self.outbuf = b"", b""
        self.streaming = False
        self.closing = False
        self.refused = None           # the answer for a peer that is not served
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
                    if not isinstance(request, dict):
                        raise ValueError("not an object")
                except ValueError:
                    self.reply({"ok": False, "error": "bad request: expected one JSON object"})
                    return
                self.sup.handle_request(self, request)
            elif len(self.inbuf) > MAX_REQUEST:
                self.reply({"ok": False, "error": "request too large"})

    def send(self, obj):
        if self.sock is None:
            return
        self.outbuf += json.dumps(obj).encode() + b"\n"
        if len(self.outbuf) > 16 * 1024 * 1024:       # a follower that never reads
            self.close()
            return
        self.flush()

    def reply(self, obj, keep_open=False):
        self.streaming = keep_open
        self.send(obj)
        if not keep_open:
            self.closing = True
            if not self.outbuf:
                self.close()

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


def peer_uid(sock):
    creds = sock.getsockopt(socket.SOL_SOCKET, getattr(socket, "SO_PEERCRED", 17),
                            struct.calcsize("3i"))
    return struct.unpack("3i", creds)[1]


class ControlMixin:
    """The supervisor's side of each command."""

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
            except OSError as exc:
                self.log("warn", "control socket accept: %s" % exc)
                return
            try:
                uid = peer_uid(conn)
            except OSError:
                uid = -1
            client = ControlClient(self, conn)
            if uid not in (0, os.geteuid()):
                client.refused = "permission denied: uid %d is neither root nor the supervisor's user" % uid

    def service_json(self, svc, now):
        up = svc.uptime(now) if svc.alive() else None
        return {"name": svc.name, "state": svc.state, "pid": svc.pid,
                "started": round(svc.started, 3) if svc.started else None,
                "uptime": round(up, 3) if up is not None else None,
                "restarts": svc.restarts, "exitstatus": svc.exitstatus,
                "reason": svc.reason or None, "ready": bool(svc.ready),
                "ok": should_be_running(svc), "wanted": svc.wanted,
                "status": svc.status_text, "mainpid": svc.mainpid,
                "retry_in": round(svc.deadline - now, 3) if svc.state == BACKOFF and svc.deadline else None,
                "failures": svc.failures}

    def status_json(self, names=None):
        now = monotonic()
        svcs = [self.services[n] for n in names] if names else \
            sorted(self.services.values(), key=lambda s: (s.program.priority, s.name))
        return {"supervisor": {"pid": os.getpid(), "version": __version__, "hash": self.hash,
                               "started": round(self.started, 3), "reexecs": self.reexecs,
                               "reexeced": round(self.reexeced, 3) if self.reexeced else None,
                               "config": self.config.path, "pidfds": isinstance(self.watcher, PidfdWatcher)},
                "services": [self.service_json(s, now) for s in svcs]}

    def resolve_names(self, names, client):
        if not names:
            client.reply({"ok": False, "error": "name a service, or all"})
            return None
        if names == ["all"]:
            return sorted(self.services, key=lambda n: (self.services[n].program.priority, n))
        unknown = [n for n in names if n not in self.services]
        if unknown:
            client.reply({"ok": False, "error": "no such service: %s" % ", ".join(unknown)})
            return None
        return list(dict.fromkeys(names))

    def handle_request(self, client, req):
        cmd, args = req.get("cmd"), req.get("args") or {}
        names = args.get("names") or []
        if req.get("v", PROTOCOL) > PROTOCOL:
            self.log("debug", "client speaks protocol %s; answering as %d" % (req.get("v"), PROTOCOL))
        if cmd == "status":
            if names:
                names = self.resolve_names(names, client)
                if names is None:
                    return
            client.reply(dict(self.status_json(names), ok=True))
        elif cmd in ("start", "stop", "restart"):
            names = self.resolve_names(names, client)
            if names is None:
                return
            if self.shutting_down:
                client.reply({"ok": False, "error": "the supervisor is shutting down"})
                return
            if cmd == "start":
                for n in names:
                    svc = self.services[n]
                    svc.wanted = True
                    if not svc.alive():
                        svc.failures = 0    # an operator's start is a fresh try, even after FATAL
                for n in sorted(names, key=lambda n: (self.services[n].program.priority, n)):
                    self.start(self.services[n])    # also ends a BACKOFF wait
            elif cmd == "stop":
                for n in names:
                    self.services[n].wanted = False
                    self.services[n].stop_then_start = False
                self.stop_many(names)
            else:
                for n in names:
                    svc = self.services[n]
                    svc.wanted = True
                    svc.failures = 0
                alive = [n for n in names if self.services[n].alive()]
                for n in alive:
                    self.services[n].stop_then_start = True
                self.stop_many(alive)
                for n in names:
                    if not self.services[n].alive():
                        self.start(self.services[n])
            self.waiters.append((client, cmd, names))
            self.check_waiters()
        elif cmd == "signal":
            names = self.resolve_names(names, client)
            if names is None:
                return
            try:
                sig = signal_number(str(args.get("signal", "")))
            except ValueError:
                client.reply({"ok": False, "error": "unknown signal %r" % args.get("signal")})
                return
            sent = {}
            for n in names:
                svc = self.services[n]
                sent[n] = bool(svc.alive() and kill_group_or_pid(svc.pid, sig, False))
            client.reply({"ok": all(sent.values()), "results": sent,
                          "error": None if all(sent.values()) else "not running: %s"
                          % ", ".join(n for n, ok in sent.items() if not ok)})
        elif cmd == "reload":
            self.reload(client)
        elif cmd == "reexec":
            self.request_reexec("reexec command", client)
        elif cmd == "log":
            name = args.get("name")
            if name not in self.services:
                client.reply({"ok": False, "error": "no such service: %s" % name})
                return
            n = max(0, int(args.get("n", 20)))
            svc = self.services[name]
            sink = self.sink_for(name, "stdout") or self.sink_for(name, "stderr")
            if sink is not None:
                lines = tail_file(sink.path, n)
            else:
                lines = list(svc.tail or ())[-n:] if n else []
            follow = bool(args.get("follow"))
            client.reply({"ok": True, "lines": lines}, keep_open=follow)
            if follow:
                self.followers.setdefault(name, []).append(client)
        elif cmd == "shutdown":
            client.reply({"ok": True}, keep_open=True)
            self.shutdown_clients.append(client)
            self.shutdown()
        else:
            client.reply({"ok": False, "error": "unknown command %r" % cmd})

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
        if svc.stop_then_start or svc.state in (STARTING, STOPPING):
            return False
        if svc.state == STOPPED and svc.reason.startswith("waiting for"):
            blockers = [self.services[b] for b in start_blockers(svc, self.services)]
            return all(b.state in (FATAL, EXITED) or not b.wanted for b in blockers)
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
            self.selector.unregister(self.listener)
            self.listener.close()
            self.listener = None


# ---------------------------------------------------------------------------
# Re-execution: watch our own file, check the new one, hand the state over
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
            self.timer = sup.timers.at(monotonic() + 1.0, self.poll)

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
        self.sup.selector.register(fd, selectors.EVENT_READ, self.on_inotify)
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
            self.sup.timers.cancel(self.timer)
            self.timer = self.sup.timers.at(monotonic() + 0.3, self.settle)

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
        self.timer = self.sup.timers.at(monotonic() + 1.0, self.poll)
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
        self.sup.timers.cancel(self.timer)
        if self.fd is not None:
            self.sup.selector.unregister(self.fd)
            os.close(self.fd)
            self.fd = None


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
          "exec(c,{'__name__':'__main__','__file__':sys.argv[0],'__builtins__':__builtins__,"
          "'_LOADED_SOURCE':s})")


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
    the new one claims them.  Missing keys are fine (a state from an older release)."""
    fds = [p["fd"] for p in state.get("pipes", ())]
    fds += [s["notify"][0] for s in state.get("services", ()) if s.get("notify")]
    fds += [state.get(k) for k in ("listener", "lock", "client") if state.get(k) is not None]
    fds += [c["fd"] for c in state.get("clients", ())]
    fds += [w["fd"] for w in state.get("waiters", ())]
    return fds


class ReexecMixin:
    """The supervisor's side of re-execution: trigger, checks, exec, restore."""

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
        try:
            self.reexec_code = (new_hash, compile(code, self.script, "exec", dont_inherit=True), code)
        except (SyntaxError, ValueError) as exc:
            return self.reexec_refused("new code does not compile: %s (line %s)"
                                       % (getattr(exc, "msg", exc), getattr(exc, "lineno", "?")),
                                       new_hash, client)
        self.log("info", "%s: checking the new code (%s) before re-executing" % (why, new_hash[:12]))
        import tempfile
        # The trial parses the config and restores a snapshot of the real state in
        # a dry run: a new file that would fail after the exec fails here instead.
        try:
            out = tempfile.TemporaryFile()
            out.snapshot = snapshot = tempfile.NamedTemporaryFile(prefix="respawn-state-", suffix=".json")
            os.chmod(snapshot.name, 0o600)
            snapshot.write(json.dumps(self.handoff_state([], new_hash, None)).encode())
            snapshot.flush()
        except OSError as exc:      # a full or read-only temporary folder
            return fail("cannot write the trial's files in %s: %s" % (tempfile.gettempdir(), exc))
        self.reexec_busy = True
        self.reexec_client = client
        try:
            pid = spawn(Program("trial", {"command": (
                sys.executable, "-I", self.script, "--handoff-selftest", snapshot.name,
                "-c", self.config.path, "check", "--trial")}, {}), out.fileno(), out.fileno())
        except SpawnError as exc:
            snapshot.close()
            out.close()
            self.reexec_busy = False
            return self.reexec_refused(str(exc), None, client)
        self.helpers[pid] = "trial"
        timer = self.timers.at(monotonic() + 30.0, kill_group_or_pid, pid, signal.SIGKILL, True)
        self.watcher.watch(pid, lambda p, status: self.trial_done(p, status, out, timer, new_hash))

    def shutdown(self):
        # a trial check still running is pointless now, and must not outlive us
        for pid, purpose in list(self.helpers.items()):
            if purpose == "trial":
                kill_group_or_pid(pid, signal.SIGKILL, True)
        super().shutdown()

    def reexec_refused(self, message, bad_hash, client):
        self.log("error", "re-exec refused: %s; the running code keeps supervising" % message)
        self.reexec_code = None
        if bad_hash:
            self.rejected_hash = bad_hash
        if client:
            client.reply({"ok": False, "error": message})

    def trial_done(self, pid, status, out, timer, new_hash):
        self.helpers.pop(pid, None)
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
        try:
            self.leap(new_hash, client, pending, t0)          # returns only by raising
        except Exception as exc:
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
        state = self.handoff_state(pending, new_hash, client, t0)
        opened, kept = [], handoff_fds(state)
        try:
            state_fd = memfd("respawn-state", json.dumps(state).encode())
            opened.append(state_fd)
            rollback_fd = memfd("respawn-rollback", self.source or b"")
            opened.append(rollback_fd)
            try:
                fcntl.fcntl(rollback_fd, getattr(fcntl, "F_ADD_SEALS", 1033), 0xF)
            except OSError:
                pass
            args = [self.script, "--handoff", str(state_fd), "--rollback", str(rollback_fd)] + self.argv
            checked, self.reexec_code = self.reexec_code, None
            if checked is not None and checked[0] == new_hash:
                argv, code_fd = loader_argv(checked[1], checked[2], args)
                opened.append(code_fd)
            else:
                argv = [sys.executable] + interpreter_flags() + args
            self.log("info", "re-executing %s" % self.script)
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
            raise

    def handoff_state(self, pending, new_hash, client, t0=None):
        """t0: when supervision paused for the handoff (the handoff time counts from it)."""
        import base64
        services = []
        for svc in self.services.values():
            # a value still as a new Service starts out is left out (the state is
            # written and read inside the handoff: smaller is sooner)
            fresh = vars(Service(svc.program))
            entry = {k: getattr(svc, k) for k in Service.CARRIED if getattr(svc, k) != fresh[k]}
            entry["name"] = svc.name
            if svc.notify:
                entry["notify"] = [svc.notify[0].fileno(), svc.notify[1]]
            if svc.tail:
                entry["tail"] = list(svc.tail)
            if svc.removed:
                # the new image types programs from the config text; a removed one,
                # still stopping, is in no config any more
                entry["removed"], entry["program"] = True, dict(svc.program.raw)
            services.append(entry)
        return {
            "format": HANDOFF_FORMAT, "version": __version__, "hash": self.hash,
            "new_hash": new_hash, "t0": monotonic() if t0 is None else t0, "started": self.started,
            "reexecs": self.reexecs, "rejected_hash": self.rejected_hash,
            "config_path": self.config.path, "config_files": self.config.files,
            "config_sections": {"format": SECTIONS_FORMAT, "sections": self.config.sections},
            "pending": list(pending), "script": self.script, "argv": self.argv,
            "listener": self.listener.fileno() if self.listener else None,
            "lock": self.lock_fd, "client": client.sock.fileno() if client and client.sock else None,
            # accepted, request not read in full yet: the new image answers them (risk 15)
            "clients": [{"fd": c.sock.fileno(), "inbuf": base64.b64encode(c.inbuf).decode()}
                        for c in self.clients.values()
                        if c.sock is not None and not c.closing and not c.streaming],
            # start/restart requests waiting for their services to settle: answered
            # by the new image
            "waiters": [{"fd": c.sock.fileno(), "cmd": cmd, "names": names}
                        for c, cmd, names in self.waiters if c.sock is not None],
            "pidfile": self.pidfile,
            "helpers": list(self.helpers),
            "pipes": [dict({"fd": p.fd, "service": p.service, "stream": p.stream},
                           **({"partial": base64.b64encode(p.partial).decode()} if p.partial else {}))
                      for p in self.pipes.values()],
            "services": services,
        }

    def restore_data(self, state):
        """The plain part of the state: what a trial run checks before the exec."""
        self.started = state.get("started", self.started)
        self.reexecs = state.get("reexecs", 0) + 1
        self.reexeced = time.time()
        self.rejected_hash = state.get("rejected_hash")
        self.pidfile = state.get("pidfile")
        if self.hash != state.get("new_hash"):
            # we are the previous code, rolled back to: the new file is bad
            self.rejected_hash = state.get("new_hash")
        for entry in state.get("services", ()):
            svc = self.services.get(entry.get("name"))
            if svc is None and entry.get("removed") and entry.get("pid"):
                # removed by a reload and still stopping: not in the config any more,
                # but its process is ours to kill at stopwaitsecs and to reap
                raw = entry.get("program") or {}
                try:
                    values = {k: PROGRAM_KEYS[k][0](v) for k, v in raw.items() if k in PROGRAM_KEYS}
                except ValueError:
                    values = {}
                if "command" in values:
                    svc = self.services[entry["name"]] = Service(Program(entry["name"], values, raw))
            if svc is None:
                continue
            for key in Service.CARRIED:
                if key in entry:
                    setattr(svc, key, entry[key])
            svc.removed = entry.get("removed", False)
            if entry.get("tail"):
                from collections import deque
                svc.tail = deque(entry["tail"], maxlen=TAIL_LINES)

    def restore(self, state):
        """The new image takes over: services, pipes, sockets, timers (one pass)."""
        import base64
        now = monotonic()
        self.restore_data(state)
        if state.get("listener") is not None:
            self.adopt_listener(socket.socket(fileno=state["listener"]))
        self.lock_fd = state.get("lock")
        for pid in state.get("helpers", ()):
            self.helpers[pid] = "old helper"
            self.watcher.watch(pid, lambda p, s: self.helpers.pop(p, None))
        for entry in state.get("services", ()):
            svc = self.services.get(entry.get("name"))
            if svc is not None and entry.get("notify"):
                fd, address = entry["notify"]
                self.adopt_notify(svc, socket.socket(fileno=fd), address)
        for p in state.get("pipes", ()):
            self.add_pipe(Pipe(p["fd"], p["service"], p["stream"], base64.b64decode(p.get("partial", ""))))
        for svc in self.services.values():
            if svc.pid is not None:
                try:
                    os.waitid(os.P_PID, svc.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
                except ChildProcessError:
                    self.log("error", "pid %d is no longer our child" % svc.pid, svc.name)
                    svc.pid = None
                    self.after_exit(svc, None, "lost during re-exec")
                    continue
                self.watcher.watch(svc.pid, lambda pid, status, svc=svc: self.on_child_exit(pid, status, svc))
            self.rearm(svc, now)
        return state

    def rearm(self, svc, now):
        """Timers from the carried absolute monotonic deadlines (research F15)."""
        when = svc.deadline
        if svc.state == BACKOFF and when is not None:
            self.arm(svc, when, self.backoff_over)
        elif svc.state == STOPPING and when is not None:
            self.arm(svc, when, self.stop_timeout)
        elif svc.state == STARTING and svc.alive():
            if svc.program.ready[0] == "none":
                self.arm(svc, when if when is not None else now, self.became_ready)
            else:
                self.arm(svc, when if when is not None else now, self.ready_timeout)
                if svc.program.ready[0] in ("tcp", "exec"):
                    self.schedule_probe(svc, now, ready=True)
        elif svc.state == RUNNING and svc.alive():
            if svc.program.healthcheck:
                at = svc.health_at if svc.health_at is not None else now
                svc.health_timer = self.timers.at(at, self.run_probe, svc, svc.program.healthcheck,
                                                  False, svc.program.healthcheck_interval,
                                                  svc.program.healthcheck_interval)
            if svc.program.watchdog and svc.watchdog_at is not None:
                self.arm_watchdog(svc, svc.watchdog_at)


class RespawnSupervisor(ControlMixin, ReexecMixin, Supervisor):
    """The supervisor with its control socket and its re-execution."""


# ---------------------------------------------------------------------------
# Client: talk to the running supervisor
# ---------------------------------------------------------------------------

class NoSupervisor(Exception):
    pass


def request(path, cmd, args=None, timeout=None):
    """Send one request; yield each JSON object the supervisor answers."""
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
        buf = b""
        try:
            sock.sendall(json.dumps({"v": PROTOCOL, "cmd": cmd, "args": args or {}}).encode() + b"\n")
        except (BrokenPipeError, ConnectionResetError):
            pass                    # it may have answered (and closed) already: read that
        while True:
            try:
                data = sock.recv(65536)
            except ConnectionResetError:
                data = b""
            if not data:
                return
            buf += data
            while b"\n" in buf:
                line, buf = buf.split(b"\n", 1)
                yield json.loads(line.decode())
    finally:
        sock.close()


def format_status(services):
    rows = []
    for s in services:
        if s["pid"]:
            detail = "pid %d, uptime %s" % (s["pid"], fmt_duration(s["uptime"] or 0))
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
        rows.append((s["name"], s["state"], detail))
    width = max([len(r[0]) for r in rows] + [4])
    return "\n".join("%-*s  %-9s %s" % (width, n, st, d) for n, st, d in rows)


# ---------------------------------------------------------------------------
# Command line: run, check, and the client commands
# ---------------------------------------------------------------------------

class AlreadyRunning(Exception):
    pass


def acquire_lock(sock_path):
    """flock beside the socket: one supervisor per config, released by the kernel
    when the process dies, so a stale lock can never block a restart."""
    make_private_dir(os.path.dirname(sock_path))
    fd = os.open(sock_path + ".lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        try:
            pid = os.pread(fd, 32, 0).decode().strip() or "?"
        finally:
            os.close(fd)
        raise AlreadyRunning(pid) from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, b"%d\n" % os.getpid(), 0)
    return fd


def write_pidfile(path):
    tmp = "%s.%d.tmp" % (path, os.getpid())
    with open(tmp, "w") as f:
        f.write("%d\n" % os.getpid())
    os.replace(tmp, path)


def find_config(explicit):
    if explicit:
        return explicit
    candidates = [os.environ.get("RESPAWN_CONFIG"), "respawn.ini",
                  os.path.join(os.path.dirname(os.path.realpath(__file__)), "respawn.ini"),
                  "/etc/respawn.ini"]
    for c in candidates:
        if c and os.path.isfile(c):
            return c
    return os.environ.get("RESPAWN_CONFIG") or "respawn.ini"


def print_problems(exc, out=sys.stderr):
    for w in exc.warnings:
        out.write("%s: warning: %s\n" % (str(w).split(": ", 1)[0], w.message))
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
            s.connect(address)
            s.sendall(message.encode())
    except OSError:
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
            print("started (pid %s)" % text.split()[1], flush=True)    # os._exit does not flush
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


def cmd_run(args, config_path, script, source):
    try:
        config = load_config(config_path)
    except ConfigErrors as exc:
        print_problems(exc)
        return EXIT_CONFIG
    for w in config.warnings:
        sys.stderr.write("%s: warning: %s\n" % (str(w).split(": ", 1)[0], w.message))
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
        lock_fd = acquire_lock(sock_path)
    except AlreadyRunning as exc:
        message = "already running (pid %s)" % exc.args[0]
        if report is not None:
            os.write(report, ("already " + message).encode())
        else:
            print(message)
        return EXIT_OK
    except OSError as exc:
        message = "cannot take the lock beside %s: %s" % (sock_path, exc.strerror or exc)
        if report is not None:
            os.write(report, message.encode())
        sys.stderr.write(message + "\n")
        return EXIT_FAIL
    sup = RespawnSupervisor(config, script, ["-c", config.path, "run"], source)
    sup.lock_fd = lock_fd
    sup.pidfile = config.settings["pidfile"]
    try:
        sup.install_signals()
        sup.open_listener(sock_path)
        if sup.pidfile:
            write_pidfile(sup.pidfile)
    except OSError as exc:
        message = "cannot start: %s" % exc
        sup.log("error", message)
        if report is not None:
            os.write(report, message.encode())
        return EXIT_FAIL
    if sup.reaper and not sup.pid1:
        if not set_subreaper():
            sup.log("warn", "subreaper = true, but prctl(PR_SET_CHILD_SUBREAPER) failed")
    sup.setup_file_watch()
    sup.log("info", "respawn %s (pid %d) supervising %d services from %s; control socket %s; %s"
            % (__version__, os.getpid(), len(sup.services), config.path, sock_path,
               "pidfds" if isinstance(sup.watcher, PidfdWatcher) else "SIGCHLD + waitpid"))
    # systemd's socket is ours, not our services' (sd_notify's unset_environment):
    # a service must not tell systemd it is ready, or stopping, in our name
    sup.notify_parent = os.environ.pop("NOTIFY_SOCKET", None)
    sup.start_all()
    notify_systemd("READY=1\nMAINPID=%d" % os.getpid(), sup.notify_parent)
    if report is not None:
        os.write(report, b"ok %d" % os.getpid())
        os.close(report)
    return supervise(sup)


def supervise(sup):
    """The loop, and what must happen however it ends."""
    try:
        sup.run_loop()
    finally:
        sup.close_control()
        sock = socket_path(sup.config)
        if sup.listener is None and os.path.exists(sock):
            try:
                os.unlink(sock)
            except OSError:
                pass
        if sup.pidfile:
            try:
                os.unlink(sup.pidfile)
            except OSError:
                pass
        for sink in sup.sinks.values():
            sink.close()
    return sup.exit_code


def resume(args, script, source):
    """The new image after a re-exec: take the state over, or roll back."""
    fd = args.handoff
    with os.fdopen(os.dup(fd), "rb") as f:
        state = json.loads(f.read().decode())
    claimed = {fd, args.rollback} | set(handoff_fds(state))
    _close_strays(claimed)
    try:
        if state.get("format", 1) > HANDOFF_FORMAT:
            raise ValueError("state format %s is newer than this code" % state.get("format"))
        files = state["config_files"]
        carried = state.get("config_sections") or {}
        config = load_config(state["config_path"], read=lambda p: files[p] if p in files else _read_text(p),
                             carried={"files": files, "sections": carried["sections"]}
                             if carried.get("format") == SECTIONS_FORMAT else None)
        sup = RespawnSupervisor(config, state["script"], state["argv"], source)
        sup.restore(state)
    except Exception as exc:      # anything at all: the old code takes over again
        if args.rollback is not None and os.environ.get("RESPAWN_ROLLED_BACK") != state.get("new_hash"):
            sys.stderr.write("respawn: restore failed (%s: %s); rolling back to the previous code\n"
                             % (type(exc).__name__, exc))
            sys.stderr.flush()        # exec does not flush, and 3.8's stderr is block-buffered
            os.environ["RESPAWN_ROLLED_BACK"] = state.get("new_hash") or ""
            os.set_inheritable(fd, True)
            os.lseek(fd, 0, os.SEEK_SET)
            for extra in claimed:
                if extra is not None:
                    os.set_inheritable(extra, True)
            os.execv(sys.executable, [sys.executable, "-I", "/proc/self/fd/%d" % args.rollback,
                                      "--script", state["script"], "--handoff", str(fd),
                                      "--rollback", str(args.rollback)] + state["argv"])
        raise
    os.close(fd)
    if args.rollback is not None:
        os.close(args.rollback)
    os.environ.pop("RESPAWN_ROLLED_BACK", None)
    sup.install_signals()
    sup.setup_file_watch()
    took = (monotonic() - state.get("t0", monotonic())) * 1000
    old = (state.get("hash") or "?")[:12]
    if sup.rejected_hash == state.get("new_hash") and sup.hash != state.get("new_hash"):
        sup.log("error", "rolled back to %s: the new code failed to restore" % old)
    else:
        sup.log("info", "re-executed: version %s (%s) -> %s (%s), %d services, handoff took %.1f ms"
                % (state.get("version"), old, __version__, (sup.hash or "?")[:12],
                   len(sup.services), took))
    sup.watcher.sweep()
    for signum in state.get("pending", ()):
        sup.timers.at(0, sup.on_signal, signum)
    for entry in state.get("clients", ()):
        import base64
        ControlClient(sup, socket.socket(fileno=entry["fd"])).inbuf = base64.b64decode(entry["inbuf"])
    for entry in state.get("waiters", ()):
        client = ControlClient(sup, socket.socket(fileno=entry["fd"]))
        client.closing = True             # its request was read by the old image
        sup.timers.cancel(client.timer)
        client.timer = None
        sup.waiters.append((client, entry["cmd"], entry["names"]))
    if sup.waiters:
        sup.check_waiters()
    if state.get("client") is not None:
        client = ControlClient(sup, socket.socket(fileno=state["client"]))
        client.closing = True
        client.reply({"ok": sup.rejected_hash != state.get("new_hash") or sup.hash == state.get("new_hash"),
                      "pid": os.getpid(), "version": __version__, "hash": sup.hash,
                      "handoff_ms": round(took, 1),
                      "error": None if sup.hash == state.get("new_hash") else "rolled back"})
    sup.check_all_done()
    return supervise(sup)


def _close_strays(claimed):
    """Whatever the old image left open by mistake is closed; what we claim is
    made close-on-exec again (systemd's rule, research F11)."""
    try:
        names = os.listdir("/proc/self/fd")
    except OSError:
        names = []
    for name in names:
        fd = int(name)
        if fd <= 2:
            continue
        if fd in claimed:
            try:
                os.set_inheritable(fd, False)
            except OSError:
                pass
        else:
            try:
                os.close(fd)
            except OSError:
                pass


def cmd_check(args, config_path):
    try:
        config = load_config(config_path, machine_checks=not args.trial)
    except ConfigErrors as exc:
        print_problems(exc, sys.stdout)
        return EXIT_CONFIG
    for w in config.warnings:
        print("%s: warning: %s" % (str(w).split(": ", 1)[0], w.message))
    if not args.trial:
        print("%s: ok, %d services" % (config.path, len(config.programs)))
    return EXIT_OK


def client_socket(config_path):
    """The running supervisor's socket: from the config, read without machine checks.
    A mistake elsewhere in the file does not hide the socket: the operator who is
    editing the config must still reach the supervisor, which runs the last good
    one (and `reload` then answers with the same lines as `check`)."""
    try:
        config = load_config(config_path)
    except ConfigErrors as exc:
        return (exc.settings or {}).get("socket") or default_socket(config_path)
    return socket_path(config)


def cmd_client(args, config_path):
    path = client_socket(config_path)
    cmd = args.command
    payload = {"names": args.names}
    if cmd == "signal":
        payload["signal"] = args.sig
    if cmd == "log":
        payload = {"name": args.name, "n": args.n, "follow": args.follow}
    # status must answer promptly (it is a liveness probe); the others wait for states
    answers = request(path, cmd, payload, timeout=30.0 if cmd == "status" else None)
    try:
        first = next(answers)
    except StopIteration:
        print("the supervisor closed the connection without answering")
        return EXIT_FAIL
    if not first.get("ok") and cmd != "status" or (cmd == "status" and "services" not in first):
        if first.get("results") and cmd != "signal":     # signal's results are plain booleans
            print_results(first["results"])
        for line in first.get("errors") or []:
            print(line)
        if first.get("error"):
            print(first["error"])
        return EXIT_FAIL
    if cmd == "status":
        if args.json:
            first.pop("ok", None)
            print(json.dumps(first, indent=2))
        else:
            print(format_status(first["services"]))
        return EXIT_OK if all(s.get("ok", True) for s in first["services"]) else EXIT_NOT_RUNNING
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
        for line in first["lines"]:
            print(line)
        sys.stdout.flush()
        if args.follow:
            return follow_log(path, args.name, answers)
    elif cmd == "shutdown":
        for _ in answers:
            pass
        print("stopped")
    return EXIT_OK


def follow_log(path, name, answers):
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
                answers = request(path, "log", {"name": name, "n": 0, "follow": True})
                next(answers)
                break
            except (NoSupervisor, StopIteration, OSError):
                if monotonic() > deadline:
                    return EXIT_FAIL
                selectors.select.select([], [], [], 0.1)


def print_results(results):
    for name, r in results.items():
        if r.get("ok"):
            print("%s: %s" % (name, r.get("state", "ok")))
        else:
            print("%s: ERROR (%s%s)" % (name, r.get("state"), ": %s" % r["reason"] if r.get("reason") else ""))


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
  log NAME [-n N] [-f]         show a service's recent output (-n lines, default 20);
                               -f, --follow keeps printing new lines
  shutdown                     stop every service, then the supervisor (= SIGTERM)

options:
  -c, --config FILE            config file (default: $RESPAWN_CONFIG, ./respawn.ini,
                               respawn.ini beside this script, /etc/respawn.ini)
  --version                    print the version and exit
  -h, --help                   print this help and exit

Signals: TERM/INT stop everything, HUP reloads, USR2 re-executes, USR1 reopens logs.
"""

# command: (least, most) arguments, and its own options (name: takes a value)
COMMANDS = {
    "run": ((0, 0), {"--daemon": False}),
    "check": ((0, 0), {"--trial": False}),
    "status": ((0, None), {"--json": False}),
    "start": ((1, None), {}), "stop": ((1, None), {}), "restart": ((1, None), {}),
    "signal": ((2, None), {}),
    "reload": ((0, 0), {}), "reexec": ((0, 0), {}), "shutdown": ((0, 0), {}),
    "log": ((1, 1), {"-n": True, "-f": False, "--follow": False}),
}
# options of every command; the --handoff family is how the supervisor calls itself
GLOBAL_OPTIONS = {"-c": True, "--config": True, "-h": False, "--help": False, "--version": False,
                  "--handoff": True, "--rollback": True, "--script": True,
                  "--handoff-selftest": True}


class UsageError(Exception):
    pass


def parse_args(argv):
    """The command line of SPEC.md, as a namespace.  Made by hand: argparse and
    what it imports (gettext; shutil with bz2 and lzma on 3.8) would stay in a
    supervisor's memory for its whole life, about 3 MiB."""
    import types
    args = types.SimpleNamespace(
        config=None, handoff=None, rollback=None, script=None, handoff_selftest=None,
        command=None, daemon=False, trial=False, json=False, names=[], sig=None, name=None,
        n=20, follow=False)
    words, positional = list(argv), []
    while words:
        word = words.pop(0)
        if word == "--":
            positional += words
            break
        if not word.startswith("-") or word == "-":
            if args.command is None and not positional:
                if word not in COMMANDS:
                    raise UsageError("unknown command %r%s" % (word, did_you_mean(word, COMMANDS)))
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
        if option in ("-h", "--help"):
            sys.stdout.write(HELP)
            sys.exit(EXIT_OK)
        if option == "--version":
            print("respawn.py " + __version__)
            sys.exit(EXIT_OK)
        attr = {"-c": "config", "-n": "n", "-f": "follow"}.get(option, option[2:].replace("-", "_"))
        if option in ("-n", "--handoff", "--rollback"):
            try:
                value = int(value)
            except ValueError:
                raise UsageError("%s takes a number, not %r" % (option, value))
            if value < 0:
                raise UsageError("%s takes a number of 0 or more, not %d" % (option, value))
        setattr(args, attr, True if value is None else value)
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
    try:
        args = parse_args(sys.argv[1:] if argv is None else argv)
    except UsageError as exc:
        sys.stderr.write("respawn.py: %s; respawn.py --help lists the commands\n" % exc)
        return EXIT_CONFIG
    command = args.command
    script = os.path.realpath(args.script or __file__)
    source = globals().get("_LOADED_SOURCE")
    try:
        if source is None:
            with open("/proc/self/fd/%d" % args.rollback if args.rollback is not None and args.script
                      else script, "rb") as f:
                source = f.read()
    except OSError:
        source = None
    if (code is not None and source is not None and command == "run" and args.handoff is None
            and not args.handoff_selftest and "_LOADED_SOURCE" not in globals() and sys.executable):
        # costs one interpreter start (~20 ms) and saves ~7 MiB for the supervisor's life
        argv, fd = loader_argv(code, source, [script] + sys.argv[1:])
        try:
            os.execv(sys.executable, argv)
        except OSError:
            os.close(fd)
    if args.handoff is not None:
        return resume(args, script, source)
    if args.handoff_selftest:
        try:
            with open(args.handoff_selftest, "rb") as f:
                state = json.loads(f.read().decode())
            files = state["config_files"]
            config = load_config(state["config_path"],
                                 read=lambda p: files[p] if p in files else _read_text(p))
            RespawnSupervisor(config, state["script"], state["argv"], source).restore_data(state)
        except ConfigErrors as exc:
            print_problems(exc, sys.stdout)
            return EXIT_CONFIG
        except Exception as exc:   # the trial reports any failure as one line
            print("the new code cannot restore the running state: %s: %s" % (type(exc).__name__, exc))
            return EXIT_FAIL
        # the config that counts is the one in effect, carried in the state: an
        # edit on disk that was never reloaded must not block an upgrade
        return EXIT_OK
    config_path = os.path.abspath(find_config(args.config))
    try:
        if command == "run":
            return cmd_run(args, config_path, script, source)
        if command == "check":
            return cmd_check(args, config_path)
        return cmd_client(args, config_path)
    except NoSupervisor as exc:
        print(exc)
        return EXIT_FAIL
    except socket.timeout:
        print("the supervisor did not answer in time (it may be stopped or overloaded)")
        return EXIT_FAIL
    except KeyboardInterrupt:
        return EXIT_FAIL
    except BrokenPipeError:
        return EXIT_FAIL


if __name__ == "__main__":
    sys.exit(main(code=sys._getframe().f_code))
