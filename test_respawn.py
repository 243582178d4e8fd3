"""Tests for respawn.py: stdlib unittest, also runnable by pytest.

    python3 -m unittest -v test_respawn        # or: python3 -m pytest test_respawn.py

Sections follow respawn.py: helpers and config, service policy (fake clock, no
processes), processes and output, the event loop with real supervisors,
control socket and client, re-execution, PID 1.  Tests wait on conditions
under deadlines, never on bare sleeps, and every test kills what it started.
"""

import errno
import grp
import itertools
import selectors
import threading
import random
import json
import os
import pwd
import re
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import textwrap
import time
import types
import unittest
import urllib.parse
import urllib.request

HERE = os.path.dirname(os.path.abspath(__file__))
SCRIPT = os.path.join(HERE, "respawn.py")
PY = sys.executable
sys.path.insert(0, HERE)
import respawn  # noqa: E402

DEADLINE = float(os.environ.get("RESPAWN_TEST_DEADLINE", "20"))

# A client command is an interpreter start plus a compile of respawn.py's 8000
# lines: ~0.2 s of CPU, most of what a client costs, and the suite runs hundreds
# of clients.  So client commands here run respawn.py's own code object, compiled
# once per content of the file, as __main__ with the script's argv, __file__ and
# sys.path[0]: what its LOADER does on a re-exec.  Supervisors (`run`) start from
# the file itself, as the README says; RESPAWN_TEST_PLAIN_CLIENT=1 runs every
# client from the file too.
CODE_CACHE = tempfile.mkdtemp(prefix="respawn-test-code-")
__import__("atexit").register(shutil.rmtree, CODE_CACHE, True)
CACHED_CLIENT = (
    "import marshal,os,sys,zlib;p=sys.argv[1];s=open(p,'rb').read()\n"
    "k=os.path.join(%r,'%%08x-%%d-%%x'%%(zlib.crc32(s),len(s),sys.hexversion))\n"
    "try:\n with open(k,'rb') as f:t,c=marshal.load(f)\n"
    "except (OSError,EOFError,ValueError,TypeError):t=None\n"
    "if t!=s:\n c=compile(s,p,'exec')\n"
    " try:\n  with open(k+'.%%d'%%os.getpid(),'wb') as f:marshal.dump((s,c),f)\n"
    "  os.rename(k+'.%%d'%%os.getpid(),k)\n except OSError:pass\n"
    "del sys.argv[0],t,s;sys.path[0]=os.path.dirname(os.path.realpath(p))\n"
    "exec(c,{'__name__':'__main__','__file__':os.path.abspath(p) if sys.version_info>=(3,9) else p,"
    "'__builtins__':__builtins__})") % CODE_CACHE


def respawn_argv(script, args, py=PY):
    """[py, script] + args, for a client through the compiled-once code (above)."""
    args = list(args)
    if "run" in args or os.environ.get("RESPAWN_TEST_PLAIN_CLIENT"):
        return [py, script] + args
    return [py, "-c", CACHED_CLIENT, script] + args


# ---------------------------------------------------------------------------
# Harness
# ---------------------------------------------------------------------------

def wait_for(predicate, timeout=DEADLINE, what="a condition", interval=0.02):
    """Poll a condition under a deadline; its truthy value, or AssertionError."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError("timed out after %gs waiting for %s" % (timeout, what))
        time.sleep(interval)


def pid_alive(pid):
    """True while pid exists and is not a zombie."""
    try:
        with open("/proc/%d/stat" % pid) as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def zombies_of(ppid):
    """PIDs of zombie children of ppid."""
    out = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open("/proc/%s/stat" % name) as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if fields[0] == "Z" and int(fields[1]) == ppid:
            out.append(int(name))
    return out


def proc_stat(pid):
    """The fields of /proc/PID/stat after the command name (state first), or None."""
    try:
        with open("/proc/%d/stat" % pid) as f:
            return f.read().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None


def quiet_fds(pid):
    """What pid holds open (sorted kinds), once only the listening socket is a socket."""
    kinds = []
    for fd in os.listdir("/proc/%d/fd" % pid):
        try:
            target = os.readlink("/proc/%d/fd/%s" % (pid, fd))
        except OSError:
            continue
        kinds.append(re.sub(r"\[\d+\]$", "", target) if ":" in target else target)
    return sorted(kinds) if kinds.count("socket:") == 1 else None


def fd_count(pid):
    return len(os.listdir("/proc/%d/fd" % pid))


def kill_group(pgid):
    """SIGKILL a process group we recorded, if it still is one (leader's pgid == pgid)."""
    try:
        if os.getpgid(pgid) == pgid:
            os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def with_socket(config_text, sock):
    """Put `socket = sock` into the config's [respawn] section (adding one if needed)."""
    text = textwrap.dedent(config_text).lstrip()
    if "[respawn]" in text:
        return text.replace("[respawn]", "[respawn]\nsocket = %s" % sock, 1)
    return "[respawn]\nsocket = %s\n\n%s" % (sock, text)


class Sup:
    """A supervisor under test, in a temporary folder, cleaned up whatever happens."""

    def __init__(self, test, config, script=SCRIPT, env=None, copy_script=False, name="sup"):
        self.test = test
        self.dir = tempfile.mkdtemp(prefix="respawn-test-")
        test.addCleanup(shutil.rmtree, self.dir, True)
        if copy_script:
            shutil.copy(script, os.path.join(self.dir, "respawn.py"))
            script = os.path.join(self.dir, "respawn.py")
        self.script = script
        self.sock = os.path.join(self.dir, name + ".sock")
        self.config = os.path.join(self.dir, name + ".ini")
        self.write_config(config)
        self.env = dict(os.environ, **(env or {}))
        self.env.pop("NOTIFY_SOCKET", None)
        self.proc = None
        self.seen = {}                 # service pid -> its start time (/proc stat)
        self.out_path = os.path.join(self.dir, "stdout.txt")
        self.err_path = os.path.join(self.dir, "stderr.txt")
        test.addCleanup(self.cleanup)

    def path(self, *parts):
        return os.path.join(self.dir, *parts)

    def write_config(self, config):
        text = with_socket(config.replace("{dir}", self.dir).replace("{py}", PY), self.sock)
        with open(self.config, "w") as f:
            f.write(text)

    def start(self, *extra, wait=True, prefix=()):
        self.out = open(self.out_path, "ab")
        self.err = open(self.err_path, "ab")
        self.proc = subprocess.Popen(list(prefix) + [PY, self.script, "-c", self.config, "run"] + list(extra),
                                     stdout=self.out, stderr=self.err, env=self.env,
                                     start_new_session=True, cwd=self.dir)
        if wait:
            wait_for(lambda: self.answers(), what="the supervisor's socket")
        return self

    def ctl(self, *args, timeout=60, env=None):
        """Run a client command; CompletedProcess with text output."""
        return subprocess.run(respawn_argv(self.script, ["-c", self.config] + list(args)),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              timeout=timeout, env=env or self.env)

    def answers(self):
        if self.proc is not None and self.proc.poll() is not None:
            raise AssertionError("the supervisor exited with %s:\n%s" % (self.proc.returncode, self.stderr()))
        try:
            return self.status()
        except (OSError, ValueError, AssertionError, respawn.NoSupervisor):
            return None

    def status(self):
        """status --json through the control socket, recording every service pid."""
        reply = None
        for reply in respawn.request(self.sock, "status"):
            break
        if reply is None or "services" not in reply:
            raise AssertionError("no status: %r" % (reply,))
        for s in reply["services"]:
            if s["pid"] and self.proc is not None and s["pid"] not in self.seen:
                stat = proc_stat(s["pid"])
                # only a child of our supervisor (not a namespace pid, not a reused one)
                if stat and int(stat[1]) == self.proc.pid:
                    self.seen[s["pid"]] = stat[19]
        return reply

    def svc(self, name):
        for s in self.status()["services"]:
            if s["name"] == name:
                return s
        raise AssertionError("no service %s" % name)

    def wait_state(self, name, *states, timeout=DEADLINE):
        return wait_for(lambda: (lambda s: s if s["state"] in states else None)(self.svc(name)),
                        timeout, "%s to be %s" % (name, "/".join(states)))

    def wait_pid_change(self, name, old, timeout=DEADLINE):
        return wait_for(lambda: (lambda s: s if s["pid"] and s["pid"] != old and s["state"] in
                                 ("STARTING", "RUNNING") else None)(self.svc(name)),
                        timeout, "%s to get a new pid" % name)

    def stdout(self):
        with open(self.out_path, "rb") as f:
            return f.read().decode("utf-8", "replace")

    def stderr(self):
        with open(self.err_path, "rb") as f:
            return f.read().decode("utf-8", "replace")

    def wait_log(self, text, timeout=DEADLINE, stream="stderr"):
        read = self.stderr if stream == "stderr" else self.stdout
        return wait_for(lambda: text in read(), timeout, "%r in the supervisor's %s" % (text, stream))

    def terminate(self, sig=signal.SIGTERM, timeout=DEADLINE, internal_errors=False):
        """Signal the supervisor and wait for its exit code.  A bug caught by the
        loop's guard fails the test, unless the test put it there."""
        self.proc.send_signal(sig)
        code = self.proc.wait(timeout)
        if not internal_errors and os.path.exists(self.err_path):
            errors = [l for l in self.stderr().splitlines() if "internal error at" in l]
            assert not errors, "the supervisor hit a bug: %s" % errors[0]
        return code

    def cleanup(self):
        if self.proc is not None and self.proc.poll() is None:
            try:
                self.status()
            except (OSError, ValueError, AssertionError, respawn.NoSupervisor):
                pass
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        for pid, started in self.seen.items():
            stat = proc_stat(pid)
            if stat and stat[19] == started:       # the same process, not a reused pid
                kill_group(pid)
        if self.proc is not None:
            kill_group(self.proc.pid)
            self.out.close()
            self.err.close()


def run_check(test, config_text, *extra):
    """`respawn.py check` on a config; (exit code, output)."""
    d = tempfile.mkdtemp(prefix="respawn-check-")
    test.addCleanup(shutil.rmtree, d, True)
    path = os.path.join(d, "c.ini")
    with open(path, "w") as f:
        f.write(textwrap.dedent(config_text).replace("{dir}", d))
    p = subprocess.run(respawn_argv(SCRIPT, ["-c", path, "check"] + list(extra)), stdout=subprocess.PIPE,
                       stderr=subprocess.STDOUT, text=True, timeout=60)
    return p.returncode, p.stdout, path


# ---------------------------------------------------------------------------
# Smoke: the README's commands
# ---------------------------------------------------------------------------

class TestBundledConfig(unittest.TestCase):
    def test_bundled_respawn_ini_checks_and_runs(self):
        code, out, _ = (lambda p: (p.returncode, p.stdout, None))(subprocess.run(
            [PY, SCRIPT, "-c", os.path.join(HERE, "respawn.ini"), "check"],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=60))
        self.assertEqual(code, 0, out)
        with open(os.path.join(HERE, "respawn.ini")) as f:
            text = f.read()
        # the bundled web server's port may be taken on a test machine: use a free one
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
        s.close()
        sup = Sup(self, text.replace("8080", str(port)))
        sup.start()
        sup.wait_state("web", "RUNNING")
        sup.wait_state("ticker", "RUNNING")
        sup.wait_log("ticker | tick", stream="stdout")
        self.assertEqual(sup.terminate(), 0)


# ---------------------------------------------------------------------------
# Foundation (issue 2): config and check, policy, start, respawn, stop, output
# ---------------------------------------------------------------------------

# ---------------------------------------------------------------------------
# Helpers of this section
# ---------------------------------------------------------------------------

# Every supervisor here ignores changes to respawn.py on disk: other work edits
# it while these tests run, and a re-exec in the middle would add a trial child.
HEADER = "[respawn]\nwatch_self = false\n\n"


def core_sup(test, config, **kw):
    return Sup(test, HEADER + textwrap.dedent(config).lstrip(), **kw)


def children_of(pid):
    """PIDs of the children of pid (zombies included), from /proc."""
    kids = []
    try:
        tids = os.listdir("/proc/%d/task" % pid)
    except OSError:
        return kids
    for tid in tids:
        try:
            with open("/proc/%d/task/%s/children" % (pid, tid)) as f:
                kids += [int(x) for x in f.read().split()]
        except OSError:
            pass
    return kids


def proc_status(pid):
    fields = {}
    with open("/proc/%d/status" % pid) as f:
        for line in f:
            key, _, value = line.partition(":")
            fields[key] = value.strip()
    return fields


def read_text(path):
    with open(path) as f:
        return f.read()


def write_file(path, text, mode=None):
    with open(path, "w") as f:
        f.write(textwrap.dedent(text).lstrip())
    if mode is not None:
        os.chmod(path, mode)
    return path


def temp_dir(test):
    d = tempfile.mkdtemp(prefix="respawn-core-")
    test.addCleanup(shutil.rmtree, d, True)
    return d


def load_text(test, text, machine_checks=False, name="c.ini"):
    """load_config on a config text in a temp dir; the Config (raises ConfigErrors)."""
    d = temp_dir(test)
    path = os.path.join(d, name)
    write_file(path, text.replace("{dir}", d))
    return respawn.load_config(path, machine_checks=machine_checks)


def config_errors(test, text, machine_checks=False):
    """The ConfigErrors raised for a config text, as (path, [str(error)])."""
    d = temp_dir(test)
    path = os.path.join(d, "c.ini")
    write_file(path, text.replace("{dir}", d))
    with test.assertRaises(respawn.ConfigErrors) as cm:
        respawn.load_config(path, machine_checks=machine_checks)
    return path, [str(e) for e in cm.exception.errors], cm.exception


def program(name="p", **values):
    values.setdefault("command", ("true",))
    return respawn.Program(name, values, {})


# ---------------------------------------------------------------------------
# Config: parsers
# ---------------------------------------------------------------------------

class TestCoreParsers(unittest.TestCase):
    def test_durations(self):
        for text, want in [("500ms", 0.5), ("2s", 2.0), ("1m", 60.0), ("0.5", 0.5), ("10", 10.0),
                           (".25", 0.25), ("1h", 3600.0), (" 3 s ", 3.0), ("1.5m", 90.0),
                           ("0", 0.0), ("20MS", 0.02)]:
            with self.subTest(text=text):
                self.assertAlmostEqual(respawn.parse_duration(text), want)
        for bad in ["", "abc", "5x", "-1", "1.2.3", "s", "1 m s", "10 seconds"]:
            with self.subTest(bad=bad), self.assertRaises(ValueError):
                respawn.parse_duration(bad)

    def test_equal_numbers_typed_are_one_object_of_their_own_type(self):
        # issue 15 (memory at 5000 programs): one float for every `startsecs = 0`
        self.assertIs(respawn.parse_duration("2s"), respawn.parse_duration("2"))
        self.assertIs(respawn.parse_size("50MB"), respawn.parse_size("52428800"))
        self.assertIs(type(respawn.parse_duration("0")), float)   # 0.0 == 0 == False: kept apart
        self.assertIs(type(respawn.parse_size("0")), int)
        self.assertIs(type(respawn.parse_duration("0")), float)
        self.assertEqual(respawn.parse_duration("1.5m"), 90.0)

    def test_sizes_are_1024_based(self):
        for text, want in [("10KB", 10240), ("50MB", 50 * 1024 * 1024), ("1GB", 1024 ** 3),
                           ("1024", 1024), ("7B", 7), ("10kb", 10240), ("0", 0)]:
            with self.subTest(text=text):
                self.assertEqual(respawn.parse_size(text), want)
        for bad in ["", "10XB", "MB", "-1KB", "1.5MB", "ten"]:
            with self.subTest(bad=bad), self.assertRaises(ValueError):
                respawn.parse_size(bad)

    def test_bools(self):
        for text in ["true", "yes", "on", "1", "TRUE", " True "]:
            self.assertIs(respawn.parse_bool(text), True, text)
        for text in ["false", "no", "off", "0", "False"]:
            self.assertIs(respawn.parse_bool(text), False, text)
        for bad in ["", "maybe", "2", "yess"]:
            with self.subTest(bad=bad), self.assertRaises(ValueError):
                respawn.parse_bool(bad)

    def test_signals(self):
        for text in ["TERM", "SIGTERM", "term", "15"]:
            self.assertEqual(respawn.parse_signal(text), signal.SIGTERM, text)
        self.assertEqual(respawn.parse_signal("INT"), signal.SIGINT)
        self.assertEqual(respawn.parse_signal("KILL"), signal.SIGKILL)
        self.assertEqual(respawn.parse_signal("hup"), signal.SIGHUP)
        for bad in ["", "FOO", "SIG_IGN", "SIG_DFL", "999", "-1"]:
            with self.subTest(bad=bad), self.assertRaises(ValueError):
                respawn.parse_signal(bad)

    def test_exitcodes(self):
        self.assertEqual(respawn.parse_exitcodes("0"), {0})
        self.assertEqual(respawn.parse_exitcodes("0, 2,255"), {0, 2, 255})
        for bad in ["", "abc", "0,abc", "256", "-1", "0,,2"]:
            with self.subTest(bad=bad), self.assertRaises(ValueError):
                respawn.parse_exitcodes(bad)

    def test_autorestart_and_startretries(self):
        self.assertIs(respawn.parse_autorestart("true"), True)
        self.assertIs(respawn.parse_autorestart("false"), False)
        self.assertEqual(respawn.parse_autorestart("Unexpected"), "unexpected")
        with self.assertRaises(ValueError):
            respawn.parse_autorestart("sometimes")
        self.assertEqual(respawn.parse_startretries("3"), 3)
        self.assertEqual(respawn.parse_startretries("0"), 0)
        self.assertIsNone(respawn.parse_startretries("forever"))
        for bad in ["-1", "x", "", "3.5"]:
            with self.subTest(bad=bad), self.assertRaises(ValueError):
                respawn.parse_startretries(bad)

    def test_environment_umask_command(self):
        self.assertEqual(respawn.parse_environment('A="1",B="two words, comma",C=3'),
                         {"A": "1", "B": "two words, comma", "C": "3"})
        with self.assertRaises(ValueError):
            respawn.parse_environment("no-equals-sign")
        with self.assertRaises(ValueError):
            respawn.parse_environment('1BAD="x"')
        self.assertEqual(respawn.parse_umask("022"), 0o22)
        self.assertEqual(respawn.parse_umask("0077"), 0o77)
        for bad in ["999", "abc", "1000"]:
            with self.subTest(bad=bad), self.assertRaises(ValueError):
                respawn.parse_umask(bad)
        self.assertEqual(respawn.parse_command("sh -c 'echo a b'"), ("sh", "-c", "echo a b"))
        for bad in ["", "   ", "echo 'unclosed"]:
            with self.subTest(bad=bad), self.assertRaises(ValueError):
                respawn.parse_command(bad)


# ---------------------------------------------------------------------------
# Config: load_config and `check`
# ---------------------------------------------------------------------------

ALL_BAD = """\
[respawn]
loglevl = info

[program:a]
command = /bin/sleep 10
startsecs = 5x
stdout_logfile_maxbytes = 10XB
autostart = maybe
stopsignal = FOO
exitcodes = 0,abc
autorestart = sometimes
startretries = -1
comand = x
numprocs = 2
stdout_events_enabled = true

[progam:b]
command = x

[program:c]
priority = 1

[unix_http_server]
file = x

[program:d]
command = /bin/true
requires = e

[program:e]
command = /bin/true
requires = d

[program:f]
command = /bin/true
requires = zzz
"""

# (line, fragment of the message) for every error in ALL_BAD
ALL_BAD_ERRORS = [
    (2, "unknown key 'loglevl' in [respawn] (did you mean 'loglevel'?)"),
    (6, "startsecs: expected a duration"),
    (7, "stdout_logfile_maxbytes: expected a size"),
    (8, "autostart: expected true or false, not 'maybe'"),
    (9, "stopsignal: expected a signal name"),
    (10, "exitcodes: expected exit codes"),
    (11, "autorestart: expected true, false or unexpected"),
    (12, "startretries: expected a number of retries"),
    (13, "unknown key 'comand' in [program:a] (did you mean 'command'?)"),
    (14, "numprocs = 2 needs %(process_num) in process_name, as in supervisord"),
    (17, "unknown section [progam:b] (did you mean 'program:b'?)"),
    (20, "[program:c] has no command"),
    (36, "[program:f] requires 'zzz', which is not a program"),
]
ALL_BAD_WARNINGS = [(15, "warning", "'stdout_events_enabled' is a supervisord key"),
                    (23, "info", "[unix_http_server] serves supervisorctl")]


class TestCoreConfig(unittest.TestCase):
    def test_sections_alike_type_as_each_alone(self):
        # 5000 sections alike are typed once (a handoff types the carried ones):
        # each program is still its own, with its name, group, lines and values
        body = ("command = sleep 100\nstartsecs = 0\nexitcodes = 0,3\nstopsignal = INT\n"
                "environment = A=\"1\"\nready = tcp:localhost:80\n")
        text = "[group:g]\nprograms = a, b\npriority = 5\n" + "".join(
            "[program:%s]\n%s" % (name, body) for name in ("a", "b", "c", "d"))
        config = load_text(self, text)
        alone = {}
        for name in "abcd":
            solo = ("[group:g]\nprograms = %s\npriority = 5\n" % name) if name in "ab" else ""
            alone[name] = load_text(self, solo + "[program:%s]\n%s" % (name, body)).programs[name]
        skip = ("file", "line", "lines")
        for name in "abcd":
            prog = config.programs[name]
            self.assertEqual({k: v for k, v in vars(prog).items() if k not in skip},
                             {k: v for k, v in vars(alone[name]).items() if k not in skip}, name)
        a, b, c, d = (config.programs[n] for n in "abcd")
        self.assertEqual([p.group_name for p in (a, b, c, d)], ["g", "g", "c", "d"])
        self.assertEqual([p.priority for p in (a, b, c, d)], [5, 5, 999, 999])
        self.assertEqual([p.where("startsecs")[1] for p in (a, b, c, d)], [6, 13, 20, 27])
        self.assertIsNot(a.environment, b.environment)     # no mutable value shared
        self.assertIsNot(c.environment, d.environment)

    def test_sections_alike_with_a_mistake_each_say_it_at_their_line(self):
        body = "command = sleep 100\nstartsecs = soon\nbogus = 1\n"
        path, errors, exc = config_errors(self, "[program:a]\n%s[program:b]\n%s" % (body, body))
        self.assertEqual(sorted(e.split(": ", 2)[0].rsplit(":", 1)[1] + " " + e.split(": ", 2)[1]
                                for e in errors if "startsecs" in e or "bogus" in e),
                         ["3 startsecs", "4 unknown key 'bogus' in [program:a]",
                          "7 startsecs", "8 unknown key 'bogus' in [program:b]"], errors)

    def test_a_bad_name_is_said_though_its_texts_are_like_a_good_section(self):
        body = "command = sleep 100\n"
        path, errors, exc = config_errors(self, "[program:a]\n%s[program:b c]\n%s" % (body, body))
        self.assertEqual([e.split(": ", 2)[0].rsplit(":", 1)[1] for e in errors if "program name" in e],
                         ["3"], errors)

    def test_good_config_checks_ok(self):
        code, out, path = run_check(self, """\
            [respawn]
            loglevel = debug
            [program:web]
            command = sleep 100
            startsecs = 500ms
            backoff = 0.5
            backoff_max = 1m
            stdout_logfile_maxbytes = 10KB
            autorestart = unexpected
            exitcodes = 0,3
            stopsignal = INT
            startretries = forever
            environment = A="1",B="two words"
            umask = 022
            """)
        self.assertEqual(code, 0, out)
        self.assertIn("ok, 1 service", out)
        self.assertNotIn("Traceback", out)

    def test_every_kind_of_error_at_once(self):
        code, out, path = run_check(self, ALL_BAD)
        self.assertEqual(code, 2, out)
        self.assertNotIn("Traceback", out)
        lines = out.strip().splitlines()
        for line in lines:   # every problem is one line naming the file and the line
            self.assertRegex(line, r"^%s:\d+: " % re.escape(path))
        for number, fragment in ALL_BAD_ERRORS:
            self.assertTrue(any(l.startswith("%s:%d: " % (path, number)) and fragment in l
                                and ": warning: " not in l and ": info: " not in l for l in lines),
                            "no error %r at line %d in:\n%s" % (fragment, number, out))
        for number, level, fragment in ALL_BAD_WARNINGS:
            self.assertTrue(any(l.startswith("%s:%d: %s: " % (path, number, level)) and fragment in l
                                for l in lines), "no warning %r at line %d in:\n%s" % (fragment, number, out))
        self.assertTrue(any("requires cycle:" in l and re.search(r"\bd -> e -> d\b|\be -> d -> e\b", l)
                            for l in lines), out)
        # every problem reported, nothing more: errors + warnings + the cycle
        self.assertEqual(len(lines), len(ALL_BAD_ERRORS) + len(ALL_BAD_WARNINGS) + 1, out)

    def test_each_error_kind_alone(self):
        """One mistake per config: the one line names the file and the mistake's line."""
        cases = [
            ("[program:a]\ncommand = x\nstartsecs = 10 seconds\n", 3, "startsecs: expected a duration"),
            ("[program:a]\ncommand = x\nstdout_logfile_maxbytes = 5 megs\n", 3, "expected a size"),
            ("[program:a]\ncommand = x\nredirect_stderr = sure\n", 3, "expected true or false"),
            ("[program:a]\ncommand = x\nstopsignal = SIGFOO\n", 3, "expected a signal name"),
            ("[program:a]\ncommand = x\nexitcodes = 0;1\n", 3, "expected exit codes"),
            ("[program:a]\ncommand = x\nexitcodes = 300\n", 3, "expected exit codes"),
            ("[program:a]\ncommand = x\nautorestart = always\n", 3, "expected true, false or unexpected"),
            ("[program:a]\ncommand = x\nstartretries = many\n", 3, "or forever"),
            ("[program:a]\ncommand = x\nstartretries = -2\n", 3, "or forever"),
            ("[program:a]\ncommand = x\nstartsecss = 1\n", 3, "did you mean 'startsecs'?"),
            ("[program:a]\ncommand = x\n\n[programm:b]\ncommand = y\n", 4, "did you mean 'program:b'?"),
            ("[respawn]\nwatch_selff = true\n", 2, "did you mean 'watch_self'?"),
            ("[program:a]\ncommand = x\numask = 999\n", 3, "octal umask"),
            ("[program:a]\ndirectory = /tmp\n", 1, "[program:a] has no command"),
            ("[program:a]\ncommand = x\ncommand = y\n", 3, "key 'command' appears twice"),
            ("[program:a]\ncommand = x\n[program:a]\ncommand = y\n", 3, "section [program:a] appears twice"),
            ("[program:a]\ncommand = x\nrequires = b\n", 3, "requires 'b', which is not a program"),
            ("[program:a]\ncommand = x\nrequires = a\n", 3, "requires itself"),
            ("[program:web]\ncommand = x\n[program:a]\ncommand = x\nrequires = wbe\n", 5,
             "did you mean 'web'?"),
        ]
        for text, line, fragment in cases:
            with self.subTest(text=text):
                path, errors, _ = config_errors(self, text)
                self.assertEqual(len(errors), 1, errors)
                self.assertTrue(errors[0].startswith("%s:%d: " % (path, line)), errors)
                self.assertIn(fragment, errors[0])
                self.assertNotIn("\n", errors[0])

    def test_unreadable_and_malformed_files(self):
        d = temp_dir(self)
        missing = os.path.join(d, "no-such.ini")
        latin = os.path.join(d, "latin.ini")
        with open(latin, "wb") as f:
            f.write(b"[program:a]\ncommand = echo \xff\xfe\n")
        nosection = write_file(os.path.join(d, "nosection.ini"), "command = x\n")
        badline = write_file(os.path.join(d, "badline.ini"), "[program:a]\ncommand = x\nbad line here\n")
        cases = [(missing, "%s: cannot read the config: No such file or directory" % missing),
                 (latin, "%s:2: cannot read the config: 'utf-8' codec can't decode byte 0xff at "
                         "column 16" % latin),
                 (nosection, "%s:1: a key outside any section: 'command = x'" % nosection),
                 (badline, "%s:3: cannot read this line: 'bad line here' (expected key = value "
                           "or [section])" % badline)]
        for path, message in cases:
            for command in ("check", "run"):
                with self.subTest(path=path, command=command):
                    p = subprocess.run([PY, SCRIPT, "-c", path, command], stdout=subprocess.PIPE,
                                       stderr=subprocess.STDOUT, text=True, timeout=60)
                    self.assertEqual(p.returncode, 2, p.stdout)
                    lines = p.stdout.strip().splitlines()
                    self.assertEqual(len(lines), 1, p.stdout)
                    self.assertTrue(lines[0].startswith(message), lines[0])

    def test_requires_cycle_names_the_services(self):
        path, errors, _ = config_errors(self, """\
            [program:a]
            command = x
            requires = b
            [program:b]
            command = x
            requires = c
            [program:c]
            command = x
            requires = a
            [program:free]
            command = x
            """)
        self.assertEqual(len(errors), 1, errors)
        self.assertIn("requires cycle:", errors[0])
        for name in "abc":
            self.assertRegex(errors[0], r"\b%s\b" % name)
        self.assertNotIn("free", errors[0])

    def test_supervisord_keys_and_sections_are_warnings(self):
        code, out, path = run_check(self, """\
            [supervisord]
            nodaemon = true
            [unix_http_server]
            file = /tmp/x.sock
            [program:a]
            command = sleep 10
            numprocs = 1
            stdout_events_enabled = true
            process_name = %(program_name)s
            """)
        self.assertEqual(code, 0, out)
        self.assertIn("ok, 1 service", out)
        self.assertIn("%s:3: info: [unix_http_server] serves supervisorctl" % path, out)
        self.assertIn("%s:8: warning: 'stdout_events_enabled' is a supervisord key" % path, out)
        self.assertEqual(len(out.strip().splitlines()), 3, out)    # numprocs, process_name: understood
        # supervisord's own rule: several instances need distinct names
        path, errors, _ = config_errors(self, "[supervisord]\n[program:a]\ncommand = x\nnumprocs = 2\n")
        self.assertEqual(errors, ["%s:4: numprocs = 2 needs %%(process_num) in process_name, as in "
                                  "supervisord (e.g. process_name = %%(program_name)s_%%(process_num)02d)"
                                  % path])

    def test_include_relative_to_including_file(self):
        d = temp_dir(self)
        os.makedirs(os.path.join(d, "conf.d", "more"))
        main = write_file(os.path.join(d, "main.ini"), """\
            [include]
            files = conf.d/*.ini
            [program:a]
            command = echo %(here)s
            """)
        write_file(os.path.join(d, "conf.d", "b.ini"), """\
            [include]
            files = more/*.ini
            [program:b]
            command = echo %(here)s
            """)
        write_file(os.path.join(d, "conf.d", "more", "c.ini"), "[program:c]\ncommand = echo\n")
        # from another folder: patterns follow the file that holds them, not the cwd
        p = subprocess.run([PY, SCRIPT, "-c", main, "check"], cwd="/", stdout=subprocess.PIPE,
                           stderr=subprocess.STDOUT, text=True, timeout=60)
        self.assertEqual(p.returncode, 0, p.stdout)
        self.assertIn("ok, 3 services", p.stdout)
        config = respawn.load_config(main)
        self.assertEqual(sorted(config.programs), ["a", "b", "c"])
        self.assertEqual(config.programs["a"].command, ("echo", d))
        self.assertEqual(config.programs["b"].command, ("echo", os.path.join(d, "conf.d")))
        # an error in an included file names that file and its line
        write_file(os.path.join(d, "conf.d", "more", "bad.ini"), "[program:z]\ncommand = x\nstartsecs = x\n")
        with self.assertRaises(respawn.ConfigErrors) as cm:
            respawn.load_config(main)
        self.assertEqual([str(e) for e in cm.exception.errors],
                         ["%s:3: startsecs: expected a duration such as 10, 0.5, 500ms, 2s or 1m, "
                          "not 'x'" % os.path.join(d, "conf.d", "more", "bad.ini")])

    def test_sections_carried_by_a_reexec_type_to_the_same_config(self):
        # A re-exec hands the sections over (through JSON) and the new image types
        # them without reading or parsing a file: the result must be the same.
        d = temp_dir(self)
        main = write_file(os.path.join(d, "main.ini"), """\
            [respawn]
            socket = %(here)s/x.sock
            watch_config = true
            [include]
            files = conf.d/*.ini
            [program:a]
            command = sh -c 'echo "a b"' %(program_name)s
            environment = A="1",B="two words"
            startsecs = 500ms
            backoff_max = 7s
            stopsignal = INT
            exitcodes = 0,3
            autorestart = unexpected
            stdout_logfile_maxbytes = 5MB
            ready = tcp:127.0.0.1:9
            """)
        os.mkdir(os.path.join(d, "conf.d"))
        write_file(os.path.join(d, "conf.d", "b.ini"), """\
            [program:b]
            command = echo %(here)s %(ENV_HOME)s
            requires = a
            """)
        full = respawn.load_config(main)
        sections = json.loads(json.dumps(full.sections))

        def no_reading(path):
            raise AssertionError("a carried config read %s" % path)
        again = respawn.load_config(main, read=no_reading,
                                    carried={"files": full.files, "sections": sections})
        self.assertEqual(again.settings, full.settings)
        self.assertEqual(again.files, full.files)
        self.assertEqual(sorted(again.programs), ["a", "b"])
        for name, prog in full.programs.items():
            self.assertEqual(vars(again.programs[name]), vars(prog), name)
        self.assertEqual(again.programs["b"].command, ("echo", os.path.join(d, "conf.d"), os.environ["HOME"]))
        # as a handoff carries them (lines held as tuples are lists in JSON)
        self.assertEqual(json.loads(json.dumps(again.sections)), sections)

    def test_include_loop_names_the_files(self):
        d = temp_dir(self)
        os.makedirs(os.path.join(d, "sub"))
        main = write_file(os.path.join(d, "top.ini"), "[include]\nfiles = sub/*.ini\n[program:a]\ncommand = true\n")
        write_file(os.path.join(d, "sub", "inner.ini"), "[program:b]\ncommand = true\n[include]\nfiles = ../top.ini\n")
        p = subprocess.run([PY, SCRIPT, "-c", main, "check"], stdout=subprocess.PIPE,
                           stderr=subprocess.STDOUT, text=True, timeout=60)
        self.assertEqual(p.returncode, 2, p.stdout)
        self.assertNotIn("Traceback", p.stdout)
        lines = p.stdout.strip().splitlines()
        self.assertEqual(len(lines), 1, p.stdout)
        self.assertRegex(lines[0], r"^%s:4: include loop: " % re.escape(os.path.join(d, "sub", "inner.ini")))
        self.assertIn("top.ini -> inner.ini -> top.ini", lines[0])

    def test_expansions(self):
        os.environ["RESPAWN_CORE_TEST_X"] = "from the environment"
        self.addCleanup(os.environ.pop, "RESPAWN_CORE_TEST_X", None)
        config = load_text(self, """\
            [program:a]
            command = echo %(ENV_RESPAWN_CORE_TEST_X)s %(here)s/x %(program_name)s 100%%
            directory = %(here)s
            """)
        prog = config.programs["a"]
        here = os.path.dirname(config.path)
        self.assertEqual(prog.command, ("echo", "from", "the", "environment", here + "/x", "a", "100%"))
        self.assertEqual(prog.directory, here)
        path, errors, _ = config_errors(self, "[program:a]\ncommand = echo %(ENV_RESPAWN_NO_SUCH_VAR_Q)s\n")
        self.assertEqual(len(errors), 1, errors)
        self.assertIn("%s:2: environment variable RESPAWN_NO_SUCH_VAR_Q is not set" % path, errors[0])

    def test_typed_values_and_defaults(self):
        config = load_text(self, """\
            [program:a]
            command = sleep 1
            startsecs = 500ms
            stopwaitsecs = 1m
            backoff = 0.5
            stdout_logfile_maxbytes = 10KB
            stderr_logfile_maxbytes = 50MB
            stopsignal = INT
            exitcodes = 0, 2
            startretries = forever
            [program:b]
            command = sleep 1
            """)
        a, b = config.programs["a"], config.programs["b"]
        self.assertEqual((a.startsecs, a.stopwaitsecs, a.backoff), (0.5, 60.0, 0.5))
        self.assertEqual((a.stdout_logfile_maxbytes, a.stderr_logfile_maxbytes), (10240, 50 * 1024 ** 2))
        self.assertEqual((a.stopsignal, a.exitcodes, a.startretries), (signal.SIGINT, {0, 2}, None))
        # the SPEC's defaults
        self.assertEqual((b.autostart, b.autorestart, b.exitcodes, b.startsecs, b.startretries),
                         (True, True, {0}, 1.0, 3))
        self.assertEqual((b.backoff, b.backoff_max, b.stopsignal, b.stopwaitsecs),
                         (1.0, 60.0, signal.SIGTERM, 10.0))
        self.assertEqual((b.stopasgroup, b.killasgroup, b.priority, b.redirect_stderr),
                         (True, True, 999, False))
        self.assertEqual(b.stdout_logfile_maxbytes, 50 * 1024 ** 2)
        self.assertEqual(b.stdout_logfile_backups, 10)

    def test_machine_problems_fail_check_only(self):
        d = temp_dir(self)
        noexec = write_file(os.path.join(d, "noexec.sh"), "#!/bin/sh\necho hi\n", mode=0o644)
        text = """\
            [program:missing]
            command = {dir}/no-such-program --flag
            [program:noexec]
            command = %s
            [program:nodir]
            command = sleep 1
            directory = {dir}/no-such-dir
            [program:nouser]
            command = sleep 1
            user = no-such-user-respawn
            [program:notinpath]
            command = no-such-command-respawn-xyz
            [program:fine]
            command = sleep 1
            """ % noexec
        text = textwrap.dedent(text).replace("{dir}", d)
        path = write_file(os.path.join(d, "m.ini"), text)
        # without machine checks (what `run` does) the config is fine
        self.assertEqual(len(respawn.load_config(path).programs), 6)
        with self.assertRaises(respawn.ConfigErrors) as cm:
            respawn.load_config(path, machine_checks=True)
        errors = [str(e) for e in cm.exception.errors]
        # each at the line of the key that causes it
        want = [(2, "[program:missing] command '%s/no-such-program' not found" % d),
                (4, "[program:noexec] command '%s' is not executable" % noexec),
                (7, "[program:nodir] directory '%s/no-such-dir' does not exist" % d),
                (10, "[program:nouser] unknown user 'no-such-user-respawn'"),
                (12, "[program:notinpath] command 'no-such-command-respawn-xyz' not found in PATH")]
        self.assertEqual(sorted(errors), sorted("%s:%d: %s" % (path, n, m) for n, m in want))
        p = subprocess.run([PY, SCRIPT, "-c", path, "check"], stdout=subprocess.PIPE,
                           stderr=subprocess.STDOUT, text=True, timeout=60)
        self.assertEqual(p.returncode, 2, p.stdout)
        self.assertNotIn("Traceback", p.stdout)
        self.assertEqual(sorted(p.stdout.strip().splitlines()), sorted(errors))

    def test_run_with_a_config_error_exits_2_and_starts_nothing(self):
        d = temp_dir(self)
        marker = os.path.join(d, "started")
        sock = os.path.join(d, "s.sock")
        path = write_file(os.path.join(d, "c.ini"), """\
            [respawn]
            socket = %s
            watch_self = false
            [program:good]
            command = touch %s
            startsecs = 0
            [program:bad]
            command = sleep 1
            startsecs = soon
            """ % (sock, marker))
        p = subprocess.run([PY, SCRIPT, "-c", path, "run"], stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, text=True, timeout=60)
        self.assertEqual(p.returncode, 2, p.stderr)
        self.assertNotIn("Traceback", p.stderr)
        self.assertEqual(p.stderr.strip().splitlines(),
                         ["%s:9: startsecs: expected a duration such as 10, 0.5, 500ms, 2s or 1m, "
                          "not 'soon'" % path])
        self.assertFalse(os.path.exists(marker), "a service was started")
        self.assertFalse(os.path.exists(sock), "the control socket was created")
        self.assertFalse(os.path.exists(respawn.lock_path(path)), "the lock was taken")


# ---------------------------------------------------------------------------
# Service policy: step() with a fake clock, no processes
# ---------------------------------------------------------------------------

R = respawn


class World:
    """One service under the policy alone: events in, effects out, time by hand."""

    def __init__(self, rand=lambda: 0.5, blockers=None, **values):
        self.svc = R.Service(program(**values))
        self.ctx = R.Context(blockers=blockers or (lambda svc: []), rand=rand)
        self.now = 1000.0
        self.pids = itertools.count(100)
        self.log = []

    def feed(self, event):
        effects = R.step(self.svc, event, self.now, self.ctx)
        self.log.extend(effects)
        return effects

    def later(self, seconds):
        self.now += seconds

    def spawned(self, effects):
        """Answer a Spawn effect the way the supervisor does."""
        assert R.Spawn() in effects, effects
        return self.feed(R.Spawned(next(self.pids), 0.0))

    def start(self):
        return self.spawned(self.feed(R.Want(R.UP)))

    def running(self):
        """Started and ready (ready = none: alive for startsecs)."""
        self.start()
        if self.svc.state == R.STARTING:
            self.later(self.svc.program.startsecs)
            self.feed(R.Deadline("startsecs"))
        assert self.svc.state == R.RUNNING, self.svc.state
        return self.svc.pid

    def due(self, effects, what):
        """The time an Arm effect set for `what`."""
        arms = [e.when for e in effects if isinstance(e, R.Arm) and e.what == what]
        assert arms, "no Arm(%s) in %s" % (what, effects)
        return arms[-1]

    def logged(self, text):
        return [e.message for e in self.log if isinstance(e, R.Log) and text in e.message]


def failed_starts_until_fatal(prog_values, limit=10000, rand=lambda: 0.5):
    """A service whose every start fails at once: the number of starts until
    FATAL (None if not FATAL within limit) and the backoff delays."""
    w = World(rand=rand, **prog_values)
    delays = []
    effects = w.feed(R.Want(R.UP))
    for start in range(1, limit + 1):
        w.spawned(effects)
        w.later(0.01)                                 # dies long before startsecs
        effects = w.feed(R.Exited(1))
        if w.svc.state == R.FATAL:
            return start, delays
        assert w.svc.state == R.BACKOFF, w.svc.state
        delay = w.due(effects, "backoff_over") - w.now
        delays.append(delay)
        w.later(delay)
        effects = w.feed(R.Deadline("backoff_over"))
    return None, delays


class TestCorePolicy(unittest.TestCase):
    def test_backoff_delay_bounds(self):
        prog = program(backoff=0.5, backoff_max=3.0)
        for n, d in [(1, 0.5), (2, 1.0), (3, 2.0), (4, 3.0), (5, 3.0), (30, 3.0), (5000, 3.0)]:
            with self.subTest(n=n):
                self.assertAlmostEqual(respawn.backoff_delay(prog, n, rand=lambda: 0.0), d / 2)
                self.assertAlmostEqual(respawn.backoff_delay(prog, n, rand=lambda: 1.0), d)
                self.assertAlmostEqual(respawn.backoff_delay(prog, n, rand=lambda: 0.5), d * 0.75)
        import random
        rng = random.Random(7)
        draws = [respawn.backoff_delay(prog, 2, rand=rng.random) for _ in range(500)]
        self.assertTrue(all(0.5 <= x <= 1.0 for x in draws))
        self.assertGreater(max(draws) - min(draws), 0.3)     # jittered, not fixed

    def test_startretries_n_means_n_more_attempts(self):
        for n in (0, 1, 3, 7):
            with self.subTest(startretries=n):
                starts, delays = failed_starts_until_fatal(dict(startretries=n, backoff=1.0,
                                                                backoff_max=100.0))
                self.assertEqual(starts, n + 1)
                self.assertEqual(len(delays), n)
                # exponential: 1, 2, 4, ... each drawn at 0.75 of d
                for got, want in zip(delays, [0.75 * 2 ** i for i in range(n)]):
                    self.assertAlmostEqual(got, want)

    def test_startretries_zero_is_fatal_at_first_failure(self):
        w = World(startretries=0)
        w.start()
        w.later(0.1)
        effects = w.feed(R.Exited(1))
        self.assertEqual(w.svc.state, R.FATAL)
        self.assertIn(R.StateChanged(R.STARTING, R.FATAL), effects)
        self.assertEqual(w.svc.failures, 1)
        self.assertEqual(w.svc.exitstatus, 1)
        self.assertIn("gave up after 1 failed start", w.svc.reason)
        self.assertNotIn("1 failed starts", w.svc.reason)
        self.assertNotIn(R.ExitOnFatal(), effects)

    def test_exit_on_fatal_asks_to_stop_everything(self):
        w = World(startretries=0)
        w.ctx.exit_on_fatal = True
        w.start()
        self.assertIn(R.ExitOnFatal(), w.feed(R.Exited(1)))

    def test_forever_never_gives_up_and_is_capped(self):
        values = dict(startretries=None, backoff=0.1, backoff_max=5.0)
        starts, delays = failed_starts_until_fatal(values, limit=2000, rand=lambda: 1.0)
        self.assertIsNone(starts)
        self.assertEqual(len(delays), 2000)
        self.assertAlmostEqual(max(delays), 5.0)
        self.assertAlmostEqual(delays[-1], 5.0)
        self.assertAlmostEqual(delays[0], 0.1)
        _, low = failed_starts_until_fatal(values, limit=300, rand=lambda: 0.0)
        self.assertAlmostEqual(low[-1], 2.5)

    def test_a_spawn_that_fails_is_a_failed_start(self):
        w = World(startretries=1, backoff=2.0)
        effects = w.feed(R.Want(R.UP))
        effects = w.feed(R.SpawnFailed("command 'nope' not found"))
        self.assertEqual(w.svc.state, R.BACKOFF)
        self.assertEqual(w.svc.failures, 1)
        self.assertIn(R.Log("error", "command 'nope' not found"), effects)
        self.assertEqual(w.due(effects, "backoff_over"), w.now + 1.5)
        w.later(1.5)
        self.assertIn(R.Spawn(), w.feed(R.Deadline("backoff_over")))
        w.feed(R.SpawnFailed("command 'nope' not found"))
        self.assertEqual(w.svc.state, R.FATAL)

    def test_a_good_run_restarts_at_once_and_resets_failures(self):
        w = World(startsecs=1.0, startretries=3, rand=lambda: 1.0)
        w.svc.failures = 3                    # three failed starts before this good one
        w.running()
        self.assertEqual(w.svc.failures, 0)   # reset as the start succeeded
        w.later(0.5)
        effects = w.feed(R.Exited(1))
        self.assertIn(R.Spawn(), effects)     # restarted at once
        self.assertNotIn(R.BACKOFF, [e.new for e in effects if isinstance(e, R.StateChanged)])
        self.assertEqual(w.svc.restarts, 1)
        self.assertEqual(w.logged("exit 1 after 0:00:01; restarting"), ["exit 1 after 0:00:01; restarting"])
        # and the next failure starts the count (and the backoff) over
        w.spawned(effects)
        w.later(0.1)
        effects = w.feed(R.Exited(1))
        self.assertEqual(w.svc.state, R.BACKOFF)
        self.assertEqual(w.due(effects, "backoff_over"), w.now + 1.0)
        self.assertEqual(w.svc.failures, 1)

    def test_a_short_run_is_a_failed_start(self):
        w = World(startsecs=2.0, startretries=3, backoff=0.5, rand=lambda: 0.0)
        w.svc.program.ready = ("tcp", ("127.0.0.1", 1))
        w.start()
        w.feed(R.ProbeDone("ready", True, None))      # ready, but before startsecs
        self.assertEqual(w.svc.state, R.RUNNING)
        w.later(1.0)
        effects = w.feed(R.Exited(0))
        self.assertEqual(w.svc.state, R.BACKOFF)
        self.assertEqual(w.due(effects, "backoff_over"), w.now + 0.25)
        self.assertEqual(w.svc.failures, 1)
        # alive long enough but never ready (still STARTING): failed too
        w = World(startsecs=1.0)
        w.svc.program.ready = ("notify", None)
        w.start()
        w.later(50.0)
        w.feed(R.Exited(0))
        self.assertEqual(w.svc.state, R.BACKOFF)

    def test_failed_starts_reset_when_a_start_succeeds_even_before_an_exit(self):
        w = World(startsecs=2.0)
        w.svc.program.ready = ("tcp", ("127.0.0.1", 1))
        w.svc.failures = 2
        w.start()
        effects = w.feed(R.ProbeDone("ready", True, None))
        self.assertEqual(w.svc.failures, 2)                   # ready, startsecs not reached
        self.assertEqual(w.due(effects, "started"), w.svc.started_mono + 2.0)
        w.later(2.0)
        w.feed(R.Deadline("started"))
        self.assertEqual(w.svc.failures, 0)
        # so a failed start after a good run waits d with n = 1
        w.later(100.0)
        w.feed(R.Want("restart"))
        w.feed(R.Stop("stopped"))
        effects = w.spawned(w.feed(R.Exited(0)))
        w.later(0.1)
        effects = w.feed(R.Exited(1))
        self.assertEqual(w.svc.failures, 1)
        self.assertEqual(w.due(effects, "backoff_over"), w.now + 0.75)

    def test_autorestart_false_and_unexpected(self):
        def after_good_run(status, **values):
            w = World(startsecs=1.0, **values)
            w.running()
            w.later(10.0)
            effects = w.feed(R.Exited(status))
            return R.RUNNING if R.Spawn() in effects else w.svc.state
        self.assertEqual(after_good_run(0, autorestart=True), respawn.RUNNING)
        self.assertEqual(after_good_run(0, autorestart=False), respawn.EXITED)
        self.assertEqual(after_good_run(3, autorestart=False), respawn.EXITED)
        self.assertEqual(after_good_run(-9, autorestart=False), respawn.EXITED)
        codes = frozenset([0, 2])
        self.assertEqual(after_good_run(0, autorestart="unexpected", exitcodes=codes), respawn.EXITED)
        self.assertEqual(after_good_run(2, autorestart="unexpected", exitcodes=codes), respawn.EXITED)
        self.assertEqual(after_good_run(1, autorestart="unexpected", exitcodes=codes), respawn.RUNNING)
        self.assertEqual(after_good_run(-15, autorestart="unexpected", exitcodes=codes), respawn.RUNNING)

    def test_one_shot_with_expected_code_is_exited_not_failed(self):
        for autorestart in (False, "unexpected"):
            with self.subTest(autorestart=autorestart):
                w = World(startsecs=5.0, autorestart=autorestart, exitcodes=frozenset([0, 4]),
                          startretries=0)
                w.start()
                w.later(0.01)
                w.feed(R.Exited(4))
                self.assertEqual(w.svc.state, R.EXITED)
                self.assertEqual(w.svc.failures, 0)
                self.assertTrue(respawn.should_be_running(w.svc))     # status does not count it as down
                # an unexpected code that fast is a failed start (startretries 0: FATAL)
                w.start()
                w.later(0.01)
                w.feed(R.Exited(1))
                self.assertEqual(w.svc.state, R.FATAL)

    def test_ready_timeout_kills_and_counts_a_failed_start(self):
        w = World(startsecs=1.0, autorestart=False, ready_timeout=3.0, stopwaitsecs=4.0)
        w.svc.program.ready = ("notify", None)
        effects = w.start()
        self.assertEqual(w.due(effects, "ready_timeout"), w.now + 3.0)
        w.later(3.0)
        pid = w.svc.pid
        effects = w.feed(R.Deadline("ready_timeout"))
        self.assertEqual(w.svc.state, R.STOPPING)
        self.assertIn(R.Signal(pid, signal.SIGTERM, True), effects)
        self.assertIn(R.Log("warn", "not ready within 3s"), effects)
        self.assertEqual(w.due(effects, "stop_timeout"), w.now + 4.0)
        w.later(0.2)
        effects = w.feed(R.Exited(0))     # a start we killed is a failure whatever its code
        self.assertEqual(w.svc.state, R.BACKOFF)
        self.assertEqual(w.svc.failures, 1)
        self.assertEqual(w.svc.reason, "not ready within 3s")

    def test_ready_probe_retries_until_ready(self):
        w = World(startsecs=0.0)
        w.svc.program.ready = ("exec", ("true",))
        effects = w.start()
        self.assertEqual(w.svc.state, R.STARTING)
        w.later(w.due(effects, "probe") - w.now)
        self.assertEqual(w.feed(R.Deadline("probe")), [R.StartProbe("ready")])
        effects = w.feed(R.ProbeDone("ready", False, "exit 1"))
        self.assertEqual(w.due(effects, "probe"), w.now + 0.1)
        effects = w.feed(R.ProbeDone("ready", True, None))
        self.assertEqual(w.svc.state, R.RUNNING)
        self.assertTrue(w.svc.ready)
        self.assertIn(R.CancelProbes(), effects)
        self.assertIsNone(w.svc.probe_at)
        # READY=1 too, for ready = notify
        w = World(startsecs=0.0)
        w.svc.program.ready = ("notify", None)
        w.start()
        effects = w.feed(R.NotifyMessage({"READY": "1", "STATUS": "up"}))
        self.assertEqual(w.svc.state, R.RUNNING)
        self.assertEqual(w.svc.status_text, "up")
        self.assertIn(R.Log("info", "READY=1"), effects)

    def test_a_crash_loop_backs_off_in_backoff_and_never_goes_fatal(self):
        w = World(startsecs=1.0, startretries=0, backoff=1.0, backoff_max=8.0, backoff_reset=60.0)
        w.running()
        w.later(5.0)
        self.assertIn(R.Spawn(), w.feed(R.Exited(1)))       # the first: at once
        delays = []
        for n in range(1, 7):
            w.spawned([R.Spawn()])
            w.later(1.0)
            w.feed(R.Deadline("startsecs"))
            w.later(2.0)                                     # ran past startsecs, then crashed
            effects = w.feed(R.Exited(1))
            self.assertEqual(w.svc.state, R.BACKOFF)         # so status exits 3
            self.assertFalse(R.should_be_running(w.svc))
            self.assertEqual(w.svc.unplanned, n)
            delays.append(w.due(effects, "backoff_over") - w.now)
            w.later(delays[-1])
            self.assertIn(R.Spawn(), w.feed(R.Deadline("backoff_over")))
        self.assertEqual(delays, [0.75, 1.5, 3.0, 6.0, 6.0, 6.0])
        self.assertEqual(w.svc.failures, 0)                  # never a failed start, never FATAL
        self.assertEqual(len(w.logged("unplanned restart")), 6)
        self.assertIn("exit 1 after 0:00:03; unplanned restart 1 within 60s, restarting in 0.75s",
                      w.logged("unplanned restart")[0])
        # a stable run (longer than backoff_reset) makes the next one immediate again
        w.spawned([R.Spawn()])
        w.later(1.0)
        w.feed(R.Deadline("startsecs"))
        w.later(60.0)
        self.assertIn(R.Spawn(), w.feed(R.Exited(1)))
        self.assertEqual(w.svc.unplanned, 0)

    def test_backoff_reset_zero_is_always_immediate(self):
        w = World(startsecs=0.0, backoff_reset=0.0)
        w.running()
        for _ in range(50):
            effects = w.feed(R.Exited(-9))
            self.assertIn(R.Spawn(), effects)
            w.spawned(effects)
        self.assertEqual(w.svc.restarts, 50)
        self.assertEqual(w.svc.state, R.RUNNING)

    def test_failing_healthcheck_restarts_by_the_unplanned_schedule(self):
        w = World(startsecs=0.0, healthcheck_interval=10.0, healthcheck_failures=3, backoff=4.0,
                  backoff_reset=60.0)
        w.svc.program.healthcheck = ("exec", ("false",))
        states = []
        w.running()
        for restart in range(3):
            self.assertEqual(w.svc.health_at, w.now + 10.0)
            for check in range(1, 4):
                w.later(10.0)
                self.assertEqual(w.feed(R.Deadline("health")), [R.StartProbe("health")])
                effects = w.feed(R.ProbeDone("health", False, "false exited with exit 1"))
            pid = w.svc.pid
            self.assertEqual(w.svc.state, R.STOPPING)
            self.assertIn(R.Signal(pid, signal.SIGTERM, True), effects)
            w.later(0.1)
            effects = w.feed(R.Exited(-15))
            states.append(w.svc.state)
            if w.svc.state == R.BACKOFF:
                w.later(w.due(effects, "backoff_over") - w.now)
                effects = w.feed(R.Deadline("backoff_over"))
            w.spawned(effects)
        # the first immediate, then BACKOFF: never every interval forever
        self.assertEqual(states, [R.STOPPED, R.BACKOFF, R.BACKOFF])
        self.assertEqual(len(w.logged("restarting: healthcheck failed 3 times")), 3)

    def test_a_passing_check_resets_the_count(self):
        w = World(startsecs=0.0, healthcheck_interval=5.0, healthcheck_failures=2)
        w.svc.program.healthcheck = ("tcp", ("127.0.0.1", 1))
        w.running()
        for ok in (False, True, False, True, False):
            w.feed(R.ProbeDone("health", ok, "refused"))
        self.assertEqual(w.svc.state, R.RUNNING)
        self.assertEqual(w.svc.health_failures, 1)

    def test_watchdog_silence_and_trigger_restart(self):
        w = World(startsecs=0.0, watchdog=2.0)
        w.svc.program.ready = ("notify", None)
        w.start()
        effects = w.feed(R.NotifyMessage({"READY": "1"}))
        self.assertEqual(w.due(effects, "watchdog"), w.now + 2.0)
        w.later(1.5)
        effects = w.feed(R.NotifyMessage({"WATCHDOG": "1"}))
        self.assertEqual(w.due(effects, "watchdog"), w.now + 2.0)
        w.later(2.0)
        effects = w.feed(R.Deadline("watchdog"))
        self.assertEqual(w.svc.state, R.STOPPING)
        self.assertIn("restarting: watchdog: no WATCHDOG=1 for 2s", w.logged("restarting"))
        self.assertIn(R.Spawn(), w.feed(R.Exited(-15)))
        w.spawned([R.Spawn()])
        w.feed(R.NotifyMessage({"READY": "1"}))
        w.feed(R.NotifyMessage({"WATCHDOG": "trigger"}))
        self.assertEqual(w.svc.state, R.STOPPING)
        w.feed(R.Exited(-15))
        self.assertEqual(w.svc.state, R.BACKOFF)          # within backoff_reset of the first

    def test_probes_and_exits_share_one_schedule(self):
        w = World(startsecs=0.0, healthcheck_failures=1, backoff=2.0)
        w.svc.program.healthcheck = ("tcp", ("127.0.0.1", 1))
        w.running()
        w.feed(R.ProbeDone("health", False, "refused"))
        self.assertIn(R.Spawn(), w.feed(R.Exited(-15)))    # health restart: immediate
        w.spawned([R.Spawn()])
        w.later(5.0)
        w.feed(R.Exited(1))                                # a crash soon after: backs off
        self.assertEqual(w.svc.state, R.BACKOFF)
        self.assertEqual(w.svc.unplanned, 1)

    def test_stop_signals_then_kills_at_stopwaitsecs(self):
        w = World(startsecs=0.0, stopwaitsecs=5.0, stopsignal=signal.SIGINT, stopasgroup=False)
        pid = w.running()
        effects = w.feed(R.Stop("stopped"))
        self.assertEqual(w.svc.state, R.STOPPING)
        self.assertEqual([e for e in effects if isinstance(e, R.Signal)],
                         [R.Signal(pid, signal.SIGINT, False), R.Signal(pid, signal.SIGCONT, False)])
        self.assertEqual(w.feed(R.Stop("again")), [])          # once
        w.later(5.0)
        self.assertEqual(w.feed(R.Deadline("stop_timeout")), [R.Kill()])
        effects = w.feed(R.Exited(-9))
        self.assertIn(R.Signal(pid, signal.SIGKILL, True), effects)   # no grandchild survives
        self.assertEqual(w.svc.state, R.STOPPED)
        # a service in BACKOFF or waiting is simply STOPPED by its wave
        w = World()
        w.feed(R.Want(R.UP))
        w.feed(R.SpawnFailed("no"))
        w.feed(R.Want(R.DOWN))
        effects = w.feed(R.Stop("stopped"))
        self.assertEqual(w.svc.state, R.STOPPED)
        self.assertIn(R.Arm("backoff_over", None), effects)

    def test_operator_stop_start_and_restart(self):
        w = World(startsecs=1.0, startretries=0)
        w.start()
        w.feed(R.Exited(1))
        self.assertEqual(w.svc.state, R.FATAL)
        self.assertIn(R.Spawn(), w.feed(R.Want(R.UP, True)))      # a fresh try after FATAL
        self.assertEqual(w.svc.failures, 0)
        w.spawned([R.Spawn()])
        w.feed(R.Want("restart"))
        self.assertEqual(w.svc.then, R.THEN_START)
        w.feed(R.Stop("stopped"))
        self.assertIn(R.Spawn(), w.feed(R.Exited(-15)))
        w.spawned([R.Spawn()])
        self.assertEqual(w.svc.restarts, 1)
        w.feed(R.Want(R.DOWN))
        w.feed(R.Stop("stopped"))
        self.assertNotIn(R.Spawn(), w.feed(R.Exited(-15)))
        self.assertEqual(w.svc.state, R.STOPPED)
        self.assertTrue(R.should_be_running(w.svc))              # stopped by the operator

    def test_a_start_while_stopping_starts_it_again_once_gone(self):
        w = World(startsecs=0.0)
        w.running()
        w.feed(R.Want(R.DOWN))
        w.feed(R.Stop("stopped"))
        self.assertEqual(w.feed(R.Want(R.UP, True)), [])       # nothing to do yet
        self.assertEqual(w.svc.then, R.THEN_START)
        self.assertIn(R.Spawn(), w.feed(R.Exited(-15)))

    def test_shutdown_restarts_nothing(self):
        w = World(startsecs=0.0)
        w.running()
        w.feed(R.Want("restart"))
        w.ctx.shutting_down = True
        w.feed(R.Shutdown())
        w.feed(R.Stop("stopped"))
        self.assertNotIn(R.Spawn(), w.feed(R.Exited(-15)))
        self.assertEqual(w.svc.state, R.STOPPED)
        self.assertEqual(w.feed(R.Want(R.UP)), [])

    def test_requires_waits_in_stopped(self):
        blocked = ["db"]
        w = World(blockers=lambda svc: list(blocked))
        effects = w.feed(R.Want(R.UP))
        self.assertNotIn(R.Spawn(), effects)
        self.assertEqual((w.svc.state, w.svc.waiting_for, w.svc.reason), (R.STOPPED, ["db"], "waiting for db"))
        self.assertFalse(R.should_be_running(w.svc))
        self.assertEqual(w.feed(R.Want(R.UP)), [])                # no second log line
        del blocked[:]
        self.assertIn(R.Spawn(), w.feed(R.Want(R.UP)))
        self.assertIsNone(w.svc.waiting_for)

    def test_reload_diffs(self):
        # a changed process shape: stop, then start again
        w = World(startsecs=0.0)
        w.running()
        effects = w.feed(R.ProgramChanged(program(command=("sleep", "2")), True))
        self.assertEqual((w.svc.state, w.svc.reason), (R.STOPPING, "config changed"))
        self.assertIn(R.Spawn(), w.feed(R.Exited(-15)))
        self.assertEqual(w.svc.program.command, ("sleep", "2"))
        # a changed healthcheck: the checks are re-armed, the process kept
        w = World(startsecs=0.0)
        w.running()
        changed = program(startsecs=0.0, healthcheck_interval=3.0)
        changed.healthcheck = ("tcp", ("127.0.0.1", 1))
        effects = w.feed(R.ProgramChanged(changed, False))
        self.assertEqual(w.svc.state, R.RUNNING)
        self.assertEqual(w.due(effects, "health"), w.now + 3.0)
        # autostart turned off for a service that is not running
        w = World()
        w.feed(R.ProgramChanged(program(autostart=False), False))
        self.assertEqual(w.svc.want, R.DOWN)
        # removed: stopped, then forgotten; not running: forgotten at once
        w = World(startsecs=0.0)
        w.running()
        w.feed(R.Want(R.FORGET))
        self.assertEqual(w.svc.state, R.STOPPING)
        self.assertIn(R.Forget(), w.feed(R.Exited(-15)))
        w = World()
        self.assertIn(R.Forget(), w.feed(R.Want(R.FORGET)))
        # put back while still stopping: started again once its old process is gone
        w = World(startsecs=0.0)
        w.running()
        w.feed(R.Want(R.FORGET))
        w.feed(R.ProgramChanged(program(startsecs=0.0), False))
        self.assertEqual((w.svc.want, w.svc.then), (R.UP, R.THEN_START))
        self.assertIn(R.Spawn(), w.feed(R.Exited(-15)))
        # and one put back with autostart = false stays stopped
        w = World(startsecs=0.0)
        w.running()
        w.feed(R.Want(R.FORGET))
        w.feed(R.ProgramChanged(program(autostart=False), False))
        self.assertNotIn(R.Spawn(), w.feed(R.Exited(-15)))
        self.assertEqual(w.svc.state, R.STOPPED)

    def test_stopping_announced_is_a_good_run(self):
        w = World(startsecs=30.0)
        w.svc.program.ready = ("notify", None)
        w.start()
        w.feed(R.NotifyMessage({"READY": "1"}))
        w.feed(R.NotifyMessage({"STOPPING": "1"}))
        w.later(1.0)
        self.assertIn(R.Spawn(), w.feed(R.Exited(0)))       # not a failed start

    def test_every_state_change_is_an_effect(self):
        w = World(startsecs=1.0)
        w.running()
        w.later(2.0)
        w.feed(R.Exited(1))
        changes = [(e.old, e.new) for e in w.log if isinstance(e, R.StateChanged)]
        self.assertEqual(changes, [(R.STOPPED, R.STARTING), (R.STARTING, R.RUNNING)])
        w.spawned([R.Spawn()])
        self.assertEqual([(e.old, e.new) for e in w.log if isinstance(e, R.StateChanged)][-1],
                         (R.RUNNING, R.STARTING))

    def test_deadlines_are_all_in_the_record(self):
        w = World(startsecs=5.0, watchdog=3.0, healthcheck_interval=4.0)
        w.svc.program.ready = ("tcp", ("127.0.0.1", 1))
        w.svc.program.healthcheck = ("tcp", ("127.0.0.1", 1))
        w.start()
        self.assertEqual(dict(w.svc.deadlines()), {"ready_timeout": w.now + 60.0, "probe": w.now + 0.05})
        w.feed(R.ProbeDone("ready", True, None))
        self.assertEqual(dict(w.svc.deadlines()), {"started": w.now + 5.0, "health": w.now + 4.0})
        # a probe in flight keeps its (past) time: after a re-exec it runs again
        w.later(4.0)
        w.feed(R.Deadline("health"))
        self.assertEqual(w.svc.health_at, w.now)
        # a stale deadline (cancelled meanwhile) does nothing
        self.assertEqual(w.feed(R.Deadline("backoff_over")), [])

    def test_should_be_running(self):
        def svc(state, status=None, want=R.UP, **values):
            s = respawn.Service(program(**values))
            s.state, s.exitstatus, s.want = state, status, want
            return s
        self.assertTrue(respawn.should_be_running(svc(respawn.RUNNING)))
        self.assertTrue(respawn.should_be_running(svc(respawn.STARTING)))
        for state in (respawn.FATAL, respawn.BACKOFF, respawn.STOPPED):
            self.assertFalse(respawn.should_be_running(svc(state)), state)
            self.assertTrue(respawn.should_be_running(svc(state, want=R.DOWN)), state)
        self.assertTrue(respawn.should_be_running(svc(respawn.EXITED, 0, autorestart=False)))
        self.assertFalse(respawn.should_be_running(svc(respawn.EXITED, 1, autorestart=False)))
        self.assertFalse(respawn.should_be_running(svc(respawn.EXITED, 0, autorestart=True)))

    def test_stop_waves_reverse_priority_level_by_level(self):
        progs = [program("db", priority=10), program("cache", priority=10),
                 program("api", priority=20), program("web", priority=30), program("worker", priority=30)]
        services = {p.name: respawn.Service(p) for p in progs}
        self.assertEqual(respawn.stop_waves(list(services), services),
                         [["web", "worker"], ["api"], ["cache", "db"]])
        self.assertEqual(respawn.stop_waves(["db", "web"], services), [["web"], ["db"]])

    def test_stop_waves_dependants_first_whatever_the_priority(self):
        # app requires db, but db has the higher priority number: requires wins
        progs = [program("db", priority=900), program("app", priority=1, requires=("db",)),
                 program("ui", priority=1, requires=("app",)), program("other", priority=500)]
        services = {p.name: respawn.Service(p) for p in progs}
        waves = respawn.stop_waves(list(services), services)
        order = {n: i for i, wave in enumerate(waves) for n in wave}
        self.assertLess(order["ui"], order["app"])
        self.assertLess(order["app"], order["db"])
        self.assertEqual(sorted(order), ["app", "db", "other", "ui"])
        # the exact reverse of the start (other, db, then app once db is ready, then ui):
        # app and ui start at db's level, after other, so they stop before it
        self.assertEqual(waves, [["ui"], ["app"], ["db"], ["other"]])

    def test_stop_waves_are_the_exact_reverse_of_the_start(self):
        # dep (priority 0) requires high (10): it starts after high, so it stops first
        progs = [program("low", priority=1), program("mid", priority=5), program("high", priority=10),
                 program("dep", priority=0, requires=("high",))]
        services = {p.name: respawn.Service(p) for p in progs}
        self.assertEqual(respawn.stop_waves(list(services), services),
                         [["dep"], ["high"], ["mid"], ["low"]])
        # a stop of some names keeps their places
        self.assertEqual(respawn.stop_waves(["low", "dep"], services), [["dep"], ["low"]])


class TestCoreHandoffCodec(unittest.TestCase):
    """A format-1 state (respawn 1.0.0) read as format 2, without processes."""

    def test_format_1_services_become_explicit_records(self):
        progs = {"web": program("web", healthcheck_interval=5.0), "api": program("api"),
                 "db": program("db"), "job": program("job")}
        progs["web"].healthcheck = ("tcp", ("127.0.0.1", 1))
        progs["api"].ready = ("tcp", ("127.0.0.1", 1))
        old = {"format": 1, "services": [
            {"name": "web", "state": "RUNNING", "pid": 10, "health_at": 5.0, "wanted": True},
            {"name": "api", "state": "STARTING", "pid": 11, "deadline": 70.0},
            {"name": "db", "state": "STOPPING", "pid": 12, "deadline": 9.0,
             "stop_then_start": "healthcheck failed 3 times", "notify": [7, "@x"]},
            {"name": "job", "state": "STOPPED", "reason": "waiting for db, api", "wanted": True},
            {"name": "gone", "state": "STOPPING", "pid": 13, "removed": True, "wanted": False,
             "failing": "not ready within 1s", "program": {"command": "sleep 9"}}],
            "listener": 3, "lock": 4, "client": None, "pipes": [{"fd": 5, "service": "web",
                                                                 "stream": "stdout"}],
            "clients": [{"fd": 6, "inbuf": ""}], "waiters": [{"fd": 8, "cmd": "start", "names": ["x"]}]}
        self.assertEqual(sorted(R.handoff_fds(old)), [3, 4, 5, 6, 7, 8])
        new = R.decode_handoff(old, progs, 50.0)
        self.assertEqual(new["format"], R.HANDOFF_FORMAT)
        self.assertEqual(sorted(R.handoff_fds(new)), [3, 4, 5, 6, 7, 8])
        got = {e["name"]: e for e in new["services"]}
        self.assertEqual(got["web"]["health_at"], 5.0)
        self.assertEqual(got["web"]["want"], R.UP)
        self.assertEqual((got["api"]["on_deadline"], got["api"]["deadline"], got["api"]["probe_at"]),
                         ("ready_timeout", 70.0, 50.0))
        self.assertEqual((got["db"]["on_deadline"], got["db"]["then"]), ("stop_timeout", R.THEN_UNPLANNED))
        self.assertEqual(new["fds"]["notify"], {"db": [7, "@x"]})
        self.assertEqual(got["job"]["waiting_for"], ["db", "api"])
        self.assertEqual((got["gone"]["want"], got["gone"]["then"]), (R.FORGET, R.THEN_FAILED))
        self.assertEqual(got["gone"]["program"], {"command": "sleep 9"})
        self.assertIs(R.decode_handoff(new, progs, 60.0), new)
        with self.assertRaises(ValueError):
            R.decode_handoff({"format": R.HANDOFF_FORMAT + 1}, progs, 0.0)

    def test_the_source_kept_for_a_rollback_is_packed_when_asked(self):
        # a handoff packs the running code's source once its loop turns, not in the handoff
        data = b"x = 1\n" * 1000
        later = R.Packed(data, None, now=False)
        self.assertIsNone(later.packed)
        self.assertEqual(later.data(), data)
        later.pack()
        self.assertIsNotNone(later.packed)
        self.assertIsNone(later.raw)
        self.assertEqual(later.data(), data)
        later.pack()                              # once is enough: a second does nothing
        self.assertEqual(later.data(), data)
        self.assertIsNotNone(R.Packed(data).packed)

    def test_code_that_reads_marshal_gets_marshal_and_any_other_json(self):
        state = {"format": 2, "t0": 1.5, "services": [{"name": "a", "pid": 7, "waiting_for": ("b",)}],
                 "fds": {"epoll": (4, [[5, 1]]), "client": None}, "config": {"files": {"/c": "x\u00e9"}}}
        reads = compile("HANDOFF_MARSHAL = b'x'\n", "new.py", "exec")
        data = R.dump_handoff(state, reads)
        self.assertTrue(data.startswith(R.HANDOFF_MARSHAL))
        self.assertEqual(R.load_handoff(data), state)         # tuples stay tuples
        # unknown code, code without the name (1.0.0, a downgrade): JSON, as every release reads
        as_json = json.loads(json.dumps(state))
        with open(RELEASED_1_0_0, "rb") as f:
            released = compile(f.read(), RELEASED_1_0_0, "exec", dont_inherit=True)
        for code in (None, compile("x = 1\n", "old.py", "exec"), released):
            data = R.dump_handoff(state, code)
            self.assertEqual(json.loads(data.decode()), as_json)
            self.assertEqual(R.load_handoff(data), as_json)
        # a value marshal does not write (an enum) goes as JSON too
        odd = dict(state, pending=[signal.SIGTERM])
        self.assertEqual(R.load_handoff(R.dump_handoff(odd, reads)), json.loads(json.dumps(odd)))
        # this file reads its own marshal states
        with open(SCRIPT, "rb") as f:
            ours = compile(f.read(), SCRIPT, "exec", dont_inherit=True)
        self.assertTrue(R.dump_handoff(state, ours).startswith(R.HANDOFF_MARSHAL))


# ---------------------------------------------------------------------------
# Start: environment, directory, umask, user, a clean signal state
# ---------------------------------------------------------------------------

def wait_pid(sup, name):
    return wait_for(lambda: sup.svc(name)["pid"], what="%s's pid" % name)


class TestCoreStart(unittest.TestCase):
    def test_environment_directory_umask(self):
        sup = core_sup(self, """\
            [program:env]
            command = sh -c 'echo "A=$A"; echo "B=$B"; echo "PWD=$(pwd)"; echo "HERE=%(here)s"; touch made; exec sleep 1000'
            directory = {dir}/work
            environment = A="1",B="two words, and a comma"
            umask = 027
            startsecs = 0
            """)
        os.mkdir(sup.path("work"))
        # the supervisor's own umask differs, so the service's can only come from the config
        sup.start(prefix=("sh", "-c", 'umask 002; exec "$@"', "sh"))
        sup.wait_state("env", "RUNNING")
        made = sup.path("work", "made")
        wait_for(lambda: os.path.exists(made) and "env | PWD=" in sup.stdout(), what="the service's output")
        out = sup.stdout()
        self.assertIn("env | A=1\n", out)
        self.assertIn("env | B=two words, and a comma\n", out)
        self.assertIn("env | PWD=%s\n" % sup.path("work"), out)
        self.assertIn("env | HERE=%s\n" % sup.dir, out)
        self.assertEqual(stat.S_IMODE(os.stat(made).st_mode), 0o640)
        self.assertEqual(sup.terminate(), 0)

    def test_a_services_environment_is_set_around_the_spawn_and_ours_is_left_as_it_was(self):
        # spawn() sets what a child gets beyond our environment in ours around the
        # call: the child sees it, the next child and our os.environ do not
        d = temp_dir(self)
        os.environ["RESPAWN_TEST_OURS"] = "ours"
        self.addCleanup(os.environ.pop, "RESPAWN_TEST_OURS", None)
        before = dict(os.environ)
        dump = 'env > "$0"'
        pids = []
        try:
            pids.append(respawn.spawn(
                program("a", command=("sh", "-c", dump, os.path.join(d, "a")),
                        environment={"RESPAWN_TEST_OURS": "theirs", "RESPAWN_TEST_NEW": "new"}),
                subprocess.DEVNULL, subprocess.DEVNULL, {respawn.SERVICE_MARKER: "id/a"}))
            self.assertEqual(dict(os.environ), before)
            pids.append(respawn.spawn(program("b", command=("sh", "-c", dump, os.path.join(d, "b"))),
                                      subprocess.DEVNULL, subprocess.DEVNULL, {respawn.SERVICE_MARKER: "id/b"}))
            with self.assertRaises(respawn.SpawnError):     # a name the kernel cannot hold
                respawn.spawn(program("c", environment={"RESPAWN_TEST_NEW": "x", "A=B": "1"}),
                              subprocess.DEVNULL, subprocess.DEVNULL)
            self.assertEqual(dict(os.environ), before)
            pids.append(respawn.spawn(program("d", command=("sh", "-c", dump, os.path.join(d, "d"))),
                                      subprocess.DEVNULL, subprocess.DEVNULL))
        finally:
            for pid in pids:
                os.waitpid(pid, 0)
        env = {}
        for name in "abd":
            with open(os.path.join(d, name)) as f:
                env[name] = dict(line.split("=", 1) for line in f.read().splitlines() if "=" in line)
        self.assertEqual((env["a"]["RESPAWN_TEST_OURS"], env["a"]["RESPAWN_TEST_NEW"],
                          env["a"][respawn.SERVICE_MARKER]), ("theirs", "new", "id/a"))
        self.assertEqual((env["b"]["RESPAWN_TEST_OURS"], env["b"][respawn.SERVICE_MARKER]), ("ours", "id/b"))
        self.assertNotIn("RESPAWN_TEST_NEW", env["b"])
        # what the failed spawn had set is gone again, from the C environment too
        self.assertEqual(env["d"]["RESPAWN_TEST_OURS"], "ours")
        self.assertNotIn("RESPAWN_TEST_NEW", env["d"])
        self.assertNotIn(respawn.SERVICE_MARKER, env["d"])

    @unittest.skipUnless(os.geteuid() == 0, "needs root to run a service as another user")
    def test_user_nobody(self):
        pw = pwd.getpwnam("nobody")
        sup = core_sup(self, """\
            [program:who]
            command = sh -c 'grep -E "^(Uid|Gid|Groups):" /proc/self/status; echo "HOME=$HOME USER=$USER LOGNAME=$LOGNAME"; exec sleep 1000'
            user = nobody
            directory = /
            startsecs = 0
            """)
        sup.start()
        pid = wait_pid(sup, "who")
        wait_for(lambda: "who | HOME=" in sup.stdout(), what="the service's output")
        out = sup.stdout()
        uid, gid = pw.pw_uid, pw.pw_gid
        self.assertIn("who | Uid:\t%d\t%d\t%d\t%d\n" % ((uid,) * 4), out)
        self.assertIn("who | Gid:\t%d\t%d\t%d\t%d\n" % ((gid,) * 4), out)
        groups = re.search(r"who \| Groups:(.*)\n", out).group(1).split()
        self.assertEqual(sorted(int(g) for g in groups), sorted(set(os.getgrouplist("nobody", gid))))
        self.assertIn("who | HOME=%s USER=nobody LOGNAME=nobody\n" % pw.pw_dir, out)
        # the exec'd process itself, seen from outside
        st = proc_status(pid)
        self.assertEqual(st["Uid"].split(), [str(uid)] * 4)
        self.assertEqual(sorted(int(g) for g in st["Groups"].split()),
                         sorted(set(os.getgrouplist("nobody", gid))))
        self.assertEqual(sup.terminate(), 0)

    @unittest.skipUnless(os.geteuid() == 0, "needs root to run a service as another user")
    def test_user_and_group(self):
        gname = grp.getgrgid(pwd.getpwnam("nobody").pw_gid).gr_name
        sup = core_sup(self, """\
            [program:g]
            command = sleep 1000
            user = nobody
            group = %s
            directory = /
            startsecs = 0
            """ % gname)
        sup.start()
        pid = wait_pid(sup, "g")
        st = proc_status(pid)
        self.assertEqual(st["Uid"].split(), [str(pwd.getpwnam("nobody").pw_uid)] * 4)
        self.assertEqual(st["Gid"].split(), [str(grp.getgrnam(gname).gr_gid)] * 4)
        self.assertNotIn("0", st["Groups"].split())
        self.assertEqual(sup.terminate(), 0)

    def _signal_state(self, prefix=()):
        sup = core_sup(self, """\
            [program:plain]
            command = sleep 1000
            startsecs = 0
            [program:shell]
            command = sh -c 'sleep 1000 & wait'
            startsecs = 0
            """)
        sup.start(prefix=prefix)
        pid = wait_pid(sup, "plain")
        st = proc_status(pid)
        self.assertEqual(int(st["SigBlk"], 16), 0, "blocked signals in a service: %s" % st["SigBlk"])
        self.assertEqual(int(st["SigIgn"], 16), 0, "ignored signals in a service: %s" % st["SigIgn"])
        shell = wait_pid(sup, "shell")
        st = proc_status(shell)
        self.assertEqual(int(st["SigBlk"], 16), 0)
        self.assertEqual(sup.terminate(), 0)
        return sup

    def test_services_start_with_clean_signals(self):
        self._signal_state()

    def test_clean_signals_under_nohup_and_a_blocked_mask(self):
        # like nohup (HUP ignored) plus a launcher that ignores and blocks more
        launcher = ("import os, signal, sys\n"
                    "for s in (signal.SIGHUP, signal.SIGTTOU, signal.SIGALRM, signal.SIGUSR1, signal.SIGPIPE):\n"
                    "    signal.signal(s, signal.SIG_IGN)\n"
                    "signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGALRM, signal.SIGWINCH, signal.SIGTERM})\n"
                    "os.execv(sys.argv[1], sys.argv[1:])\n")
        # the launcher's state survives its exec: what a plain program gets from it
        p = subprocess.Popen([PY, "-c", launcher, "/bin/sleep", "1000"])
        self.addCleanup(p.wait)
        self.addCleanup(p.kill)
        wait_for(lambda: proc_status(p.pid)["Name"] == "sleep", what="the exec")
        st = proc_status(p.pid)
        self.assertTrue(int(st["SigIgn"], 16) & (1 << (signal.SIGHUP - 1)))
        self.assertTrue(int(st["SigBlk"], 16) & (1 << (signal.SIGWINCH - 1)))
        # ... and what a service gets when the supervisor was started by it: nothing
        sup = self._signal_state(prefix=(PY, "-c", launcher))
        self.assertNotIn("Traceback", sup.stderr())

    def test_missing_command_backs_off_to_fatal_others_keep_running(self):
        sup = core_sup(self, """\
            [program:good]
            command = sleep 1000
            startsecs = 0
            [program:ghost]
            command = {dir}/no-such-program --flag
            startsecs = 0.2
            startretries = 2
            backoff = 0.05
            backoff_max = 0.1
            [program:noexec]
            command = {dir}/noexec.sh
            startretries = 1
            backoff = 0.05
            [program:nodir]
            command = sleep 1000
            directory = {dir}/no-such-dir
            startretries = 0
            [program:nouser]
            command = sleep 1000
            user = no-such-user-respawn
            startretries = 0
            """)
        write_file(sup.path("noexec.sh"), "#!/bin/sh\necho hi\n", mode=0o644)
        sup.start()
        good = wait_pid(sup, "good")
        ghost = sup.wait_state("ghost", "FATAL")
        self.assertIn("not found", ghost["reason"])
        self.assertIn("gave up after 3 failed starts", ghost["reason"])
        self.assertIsNone(ghost["pid"])
        err = sup.stderr()
        line = "ghost: command '%s' not found" % sup.path("no-such-program")
        self.assertEqual(err.count(line + "\n"), 3, err)
        self.assertIn("failed start 1, retrying in", err)
        self.assertIn("failed start 2, retrying in", err)
        self.assertIn("noexec", sup.wait_state("noexec", "FATAL")["name"])
        self.assertIn("noexec: cannot execute '%s'" % sup.path("noexec.sh"), sup.stderr())
        self.assertIn("does not exist", sup.wait_state("nodir", "FATAL")["reason"])
        self.assertIn("unknown user", sup.wait_state("nouser", "FATAL")["reason"])
        s = sup.svc("good")
        self.assertEqual((s["state"], s["pid"]), ("RUNNING", good))
        self.assertTrue(pid_alive(good))
        self.assertNotIn("Traceback", sup.stderr())
        self.assertEqual(sup.terminate(), 0)
        # the supervisor's own log: one line per event, each with a timestamp and a level
        lines = sup.stderr().splitlines()
        self.assertGreater(len(lines), 10)
        for line in lines:
            self.assertRegex(line, r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d{3} (DEBUG|INFO |WARN |ERROR) \S")
        self.assertTrue(any(" ERROR ghost: " in l for l in lines))
        self.assertTrue(any(" WARN  ghost: " in l for l in lines))


# ---------------------------------------------------------------------------
# Watch: respawn after SIGKILL, many times, no leak
# ---------------------------------------------------------------------------

def fast_wait(predicate, timeout=DEADLINE, what="a condition"):
    """wait_for with a short poll: the loop below waits for a thousand respawns."""
    return wait_for(predicate, timeout, what, interval=0.0005)


class TestCoreRespawn(unittest.TestCase):
    def kill_loop(self, kills, env=None, pidfds=None):
        sup = core_sup(self, """\
            [program:victim]
            command = sleep 1000
            startsecs = 0
            ; a crash loop on purpose: every unplanned restart immediate
            backoff_reset = 0
            [program:bystander]
            command = sleep 1000
            startsecs = 0
            """, env=env)
        sup.start()
        sup.wait_state("victim", "RUNNING")
        bystander = sup.wait_state("bystander", "RUNNING")["pid"]
        if pidfds is not None:
            self.assertIs(sup.status()["supervisor"]["pidfds"], pidfds)
        spid = sup.proc.pid
        pid = sup.svc("victim")["pid"]
        baseline = wait_for(lambda: quiet_fds(spid), what="no control connection open")
        seen = {pid, bystander}
        t0 = time.monotonic()
        for i in range(kills):
            os.kill(pid, signal.SIGKILL)
            new = fast_wait(lambda: [k for k in children_of(spid) if k not in seen and pid_alive(k)],
                            what="a new victim after kill %d" % (i + 1))
            self.assertEqual(len(new), 1, new)
            pid = new[0]
            seen.add(pid)
        took = time.monotonic() - t0
        sys.stderr.write("[%d kills in %.1fs] " % (kills, took))
        s = sup.svc("victim")
        self.assertEqual(s["pid"], pid)
        self.assertEqual(s["restarts"], kills)
        self.assertEqual(s["state"], "RUNNING")
        self.assertEqual(sup.svc("bystander")["pid"], bystander)
        self.assertEqual(set(children_of(spid)), {pid, bystander})
        wait_for(lambda: not zombies_of(spid), what="no zombie left")
        # every exit status reached the policy (one reaper: nothing stole one)
        self.assertEqual(sup.stderr().count("victim: killed by SIGKILL after "), kills)
        # the status request's connection is closed once answered: back to the baseline
        after = wait_for(lambda: quiet_fds(spid), timeout=5, what="no control connection open")
        self.assertEqual(after, baseline)
        self.assertEqual(fd_count(spid), len(baseline))
        self.assertEqual(sup.terminate(), 0)
        self.assertFalse(pid_alive(pid))

    def test_thousand_kills_default_watcher(self):
        self.kill_loop(1000, pidfds=respawn.pidfds_work() or None)

    def test_kills_with_sigchld_watcher(self):
        self.kill_loop(200, env={"RESPAWN_NO_PIDFD": "1"}, pidfds=False)


# ---------------------------------------------------------------------------
# Stop: order, stopsignal, stopwaitsecs, no grandchild survives
# ---------------------------------------------------------------------------

RECORDER = r"""
import os, signal, sys, time
name, log, delay = sys.argv[1], sys.argv[2], float(sys.argv[3])
def rec(what):
    fd = os.open(log, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    os.write(fd, ("%s %s %.6f\n" % (what, name, time.time())).encode())
    os.close(fd)
def on_signal(signum, frame):
    rec("got-" + signal.Signals(signum).name)
    time.sleep(delay)          # the service's own clean-up before it exits
    rec("exit")
    os._exit(0)
for s in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR1):
    signal.signal(s, on_signal)
rec("start")
while True:
    signal.pause()
"""


def read_records(path):
    got, exits, starts = {}, {}, set()
    with open(path) as f:
        for line in f:
            what, name, t = line.split()
            if what == "start":
                starts.add(name)
            elif what == "exit":
                exits[name] = float(t)
            else:
                got.setdefault(name, []).append((what[4:], float(t)))
    return got, exits, starts


def kill_members(groups):
    """Cleanup: SIGKILL recorded grandchildren still in their service's process group."""
    for leader, kids in groups.values():
        for kid in kids:
            try:
                if os.getpgid(kid) == leader:
                    os.kill(kid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass


class TestCoreStop(unittest.TestCase):
    def stop_in_order(self, sig):
        sup = core_sup(self, """\
            [program:front1]
            command = {py} {dir}/rec.py front1 {dir}/rec.log 0.4
            priority = 30
            startsecs = 0
            [program:front2]
            command = {py} {dir}/rec.py front2 {dir}/rec.log 0.4
            priority = 30
            startsecs = 0
            [program:middle]
            command = {py} {dir}/rec.py middle {dir}/rec.log 0.3
            priority = 20
            stopsignal = HUP
            startsecs = 0
            [program:back]
            command = {py} {dir}/rec.py back {dir}/rec.log 0.1
            priority = 10
            stopsignal = INT
            startsecs = 0
            """)
        write_file(sup.path("rec.py"), RECORDER)
        log = sup.path("rec.log")
        sup.start()
        names = {"front1", "front2", "middle", "back"}
        wait_for(lambda: os.path.exists(log) and read_records(log)[2] == names,
                 what="every service to install its handlers")
        pids = {n: sup.svc(n)["pid"] for n in names}
        self.assertEqual(sup.terminate(sig), 0)
        got, exits, _ = read_records(log)
        for n in names:          # each got exactly its stopsignal, once
            self.assertEqual([s for s, _ in got[n]], [{"middle": "SIGHUP", "back": "SIGINT"}.get(n, "SIGTERM")],
                             got)
            self.assertIn(n, exits)
            self.assertFalse(pid_alive(pids[n]))
        first = lambda n: got[n][0][1]
        # level by level: a level is signalled only after the one above has exited
        self.assertGreaterEqual(first("middle"), max(exits["front1"], exits["front2"]))
        self.assertGreaterEqual(first("back"), exits["middle"])
        # and a level's services are signalled together, not one after another
        self.assertLess(first("front1"), exits["front2"])
        self.assertLess(first("front2"), exits["front1"])
        self.assertIn("got %s: stopping every service" % signal.Signals(sig).name, sup.stderr())

    def test_sigterm_stops_in_reverse_priority(self):
        self.stop_in_order(signal.SIGTERM)

    def test_sigint_stops_in_reverse_priority(self):
        self.stop_in_order(signal.SIGINT)

    def test_stopwaitsecs_then_sigkill_of_the_group(self):
        sup = core_sup(self, """\
            [program:stubborn]
            command = sh -c 'trap "" TERM; sleep 1000 & echo $! > {dir}/gc.pid; sleep 1000'
            stopwaitsecs = 1
            startsecs = 0
            [program:polite]
            command = sleep 1000
            startsecs = 0
            """)
        sup.start()
        pid = wait_pid(sup, "stubborn")
        gc_path = sup.path("gc.pid")
        wait_for(lambda: os.path.exists(gc_path) and read_text(gc_path).strip(), what="the grandchild's pid")
        gc = int(read_text(gc_path))
        wait_for(lambda: int(proc_status(gc)["SigIgn"], 16) & (1 << (signal.SIGTERM - 1)),
                 what="the grandchild to ignore TERM")
        polite = wait_pid(sup, "polite")
        t0 = time.monotonic()
        self.assertEqual(sup.terminate(), 0)
        took = time.monotonic() - t0
        self.assertGreaterEqual(took, 0.9, "SIGKILL came before stopwaitsecs")
        err = sup.stderr()
        self.assertIn("stubborn: still alive after 1s: SIGKILL", err)
        self.assertIn("stubborn: stopped (killed by SIGKILL)", err)
        self.assertIn("polite: stopped (killed by SIGTERM)", err)
        self.assertNotIn("polite: still alive", err)
        for p in (pid, polite):
            self.assertFalse(pid_alive(p))
        wait_for(lambda: not pid_alive(gc), timeout=5, what="the grandchild to be gone")

    def test_no_grandchild_survives_a_stop(self):
        sup = core_sup(self, """\
            [program:family]
            command = sh -c 'sleep 1000 & sleep 1000 & wait'
            startsecs = 0
            [program:deaf]
            command = sh -c '(trap "" TERM; exec sleep 1000) & (trap "" TERM; exec sleep 1000) & wait'
            startsecs = 0
            stopwaitsecs = 30
            """)
        sup.start()
        grandchildren = {}
        for name in ("family", "deaf"):
            pid = wait_pid(sup, name)
            kids = wait_for(lambda: (lambda k: k if len(k) == 2 else None)(
                [c for c in children_of(pid) if pid_alive(c)]), what="%s's two children" % name)
            grandchildren[name] = (pid, kids)
        for kid in grandchildren["deaf"][1]:
            wait_for(lambda: proc_status(kid)["Name"] == "sleep", what="the exec of sleep")
            self.assertTrue(int(proc_status(kid)["SigIgn"], 16) & (1 << (signal.SIGTERM - 1)))
        self.addCleanup(kill_members, grandchildren)
        self.assertEqual(sup.terminate(), 0)
        # the main processes were reaped before the supervisor exited; the ones that
        # ignore TERM were killed with the group when their parent exited, not after
        # stopwaitsecs (30 s, longer than terminate() waits)
        for name, (pid, kids) in grandchildren.items():
            self.assertFalse(pid_alive(pid), name)
            for kid in kids:
                wait_for(lambda: not pid_alive(kid), timeout=5, what="%s's child %d to be gone" % (name, kid))
        self.assertNotIn("still alive", sup.stderr())

    def test_supervisor_exits_only_after_all_are_gone(self):
        sup = core_sup(self, """\
            [program:slow]
            command = {py} {dir}/rec.py slow {dir}/rec.log 0.8
            startsecs = 0
            """)
        write_file(sup.path("rec.py"), RECORDER)
        sup.start()
        pid = wait_pid(sup, "slow")
        wait_for(lambda: os.path.exists(sup.path("rec.log")) and "slow" in read_records(sup.path("rec.log"))[2],
                 what="the handler")
        self.assertEqual(sup.terminate(), 0)
        # the service took 0.8 s to exit after its TERM: the supervisor waited for it
        got, exits, _ = read_records(sup.path("rec.log"))
        self.assertEqual([s for s, _ in got["slow"]], ["SIGTERM"])
        self.assertIn("slow", exits)
        self.assertFalse(pid_alive(pid))
        wait_for(lambda: not zombies_of(sup.proc.pid), what="no zombie left")


# ---------------------------------------------------------------------------
# Output: prefixed lines, log files, rotation, reopen, floods
# ---------------------------------------------------------------------------

CHATTY = r"""
import os, sys, time
name, lines, size, pieces = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
for i in range(lines):
    line = ("%s:%d:" % (name, i)).encode() + name.encode() * size + b"\n"
    step = len(line) // pieces + 1
    for k in range(0, len(line), step):
        os.write(1, line[k:k + step])
        time.sleep(0.0002)     # write each line in pieces, slowly
"""

TICKER = r"""
import sys, time
for i in range(100000):
    sys.stdout.write("%06d tick\n" % i)
    sys.stdout.flush()
    time.sleep(0.01)
"""

FLOOD = r"""
import os, sys, time
n, done = int(sys.argv[1]), sys.argv[2]
t0 = time.monotonic()
w = sys.stdout.write
pad = "y" * 88
for i in range(n):
    w("%09d %s\n" % (i, pad))
sys.stdout.flush()
with open(done, "w") as f:
    f.write("%.3f" % (time.monotonic() - t0))
"""


def supervisor_alive(sup):
    """For a wait_for predicate: fail at once, with its log, if the supervisor died."""
    if sup.proc.poll() is not None:
        raise AssertionError("the supervisor exited with %s:\n%s" % (sup.proc.returncode, sup.stderr()[-3000:]))
    return True


def numbered(lines):
    return [int(l.split()[0]) for l in lines]


class TestCoreOutput(unittest.TestCase):
    def test_prefixed_streams_redirect_and_last_line(self):
        sup = core_sup(self, """\
            [program:streams]
            command = sh -c 'echo to-stdout; echo to-stderr >&2'
            autorestart = false
            startsecs = 0
            [program:merged]
            command = sh -c 'echo merged-out; echo merged-err >&2'
            redirect_stderr = true
            autorestart = false
            startsecs = 0
            [program:tail]
            command = printf 'first\\nno newline at the end'
            autorestart = false
            startsecs = 0
            """)
        sup.start()
        for name in ("streams", "merged", "tail"):
            sup.wait_state(name, "EXITED")
        out, err = sup.stdout(), sup.stderr()
        self.assertIn("streams | to-stdout\n", out)
        self.assertIn("streams | to-stderr\n", err)
        self.assertNotIn("streams | to-stderr", out)
        self.assertNotIn("streams | to-stdout", err)
        self.assertIn("merged | merged-out\n", out)
        self.assertIn("merged | merged-err\n", out)
        self.assertNotIn("merged | ", err)
        self.assertIn("tail | first\n", out)
        self.assertIn("tail | no newline at the end\n", out)
        self.assertEqual(sup.terminate(), 0)

    def test_last_line_without_newline_of_a_killed_service(self):
        sup = core_sup(self, """\
            [program:partial]
            command = sh -c 'printf "half a line"; exec sleep 1000'
            startsecs = 0
            autorestart = false
            """)
        sup.start()
        pid = wait_pid(sup, "partial")
        wait_for(lambda: os.path.exists("/proc/%d" % pid) and proc_status(pid)["Name"] == "sleep",
                 what="the printf")
        self.assertNotIn("half a line", sup.stdout())      # held: a line is not over yet
        os.kill(pid, signal.SIGKILL)
        sup.wait_state("partial", "EXITED")
        sup.wait_log("partial | half a line\n", stream="stdout")
        self.assertEqual(sup.terminate(), 0)

    def test_chatty_services_never_interleave_mid_line(self):
        lines, size = 60, 3000
        sup = core_sup(self, """\
            [program:aa]
            command = {py} {dir}/chatty.py A %d %d 7
            autorestart = false
            startsecs = 0
            [program:bb]
            command = {py} {dir}/chatty.py B %d %d 7
            autorestart = false
            startsecs = 0
            """ % (lines, size, lines, size))
        write_file(sup.path("chatty.py"), CHATTY)
        sup.start()
        sup.wait_state("aa", "EXITED")
        sup.wait_state("bb", "EXITED")
        out = sup.stdout().splitlines()
        for name, letter in (("aa", "A"), ("bb", "B")):
            mine = [l for l in out if l.startswith(name + " | ")]
            self.assertEqual(mine, ["%s | %s:%d:%s" % (name, letter, i, letter * size) for i in range(lines)])
        others = [l for l in out if not l.startswith(("aa | ", "bb | "))]
        self.assertEqual(others, [])

    def test_logfile_gets_exactly_what_the_service_wrote(self):
        payload = (b"alpha\n\tbeta  gamma \r\nsome | pipe\n\xff\xfe raw bytes\n\n" + b"z" * 70000
                   + b"\nno newline at the end")
        sup = core_sup(self, """\
            [program:exact]
            command = cat {dir}/payload.bin
            stdout_logfile = {dir}/logs/exact.log
            autorestart = false
            startsecs = 0
            [program:exact2]
            command = sh -c 'cat {dir}/payload.bin >&2'
            stderr_logfile = {dir}/logs/exact2.err
            autorestart = false
            startsecs = 0
            """)
        with open(sup.path("payload.bin"), "wb") as f:
            f.write(payload)
        sup.start()
        sup.wait_state("exact", "EXITED")
        sup.wait_state("exact2", "EXITED")
        for name in ("exact.log", "exact2.err"):
            with open(sup.path("logs", name), "rb") as f:
                self.assertEqual(f.read(), payload, name)
        self.assertNotIn("exact |", sup.stdout())
        self.assertNotIn("exact2 |", sup.stderr())
        self.assertNotIn("alpha", sup.stdout() + sup.stderr())
        self.assertEqual(sup.terminate(), 0)

    def test_rotation_by_maxbytes_and_backups(self):
        sup = core_sup(self, """\
            [program:rot]
            command = {py} -c "import sys; [sys.stdout.write('%%05d %%s\\n' %% (i, 'x' * 44)) for i in range(400)]"
            stdout_logfile = {dir}/rot.log
            stdout_logfile_maxbytes = 1KB
            stdout_logfile_backups = 3
            autorestart = false
            startsecs = 0
            """)
        sup.start()
        sup.wait_state("rot", "EXITED")
        base = sup.path("rot.log")
        files = [base + ".3", base + ".2", base + ".1", base]
        for f in files:
            self.assertTrue(os.path.exists(f), f)
        self.assertFalse(os.path.exists(base + ".4"), "more backups than configured")
        kept = []
        for f in files:
            with open(f, "rb") as fh:
                data = fh.read()
            self.assertTrue(data.endswith(b"\n"), "a line split across files: %s" % f)
            self.assertLessEqual(len(data), 1024, f)
            lines = data.decode().splitlines()
            for l in lines:
                self.assertRegex(l, r"^\d{5} x{44}$")
            if f != base:
                self.assertGreater(len(data) + 51, 1024, "rotated before the file was full: %s" % f)
            kept += numbered(lines)
        self.assertEqual(kept, list(range(kept[0], 400)), "lines lost, repeated or out of order")
        self.assertEqual(len(kept), 80)       # 4 files of 20 lines of 51 bytes
        self.assertEqual(sup.terminate(), 0)

    def test_logfile_unit_rotation_keeps_lines_whole(self):
        d = temp_dir(self)
        path = os.path.join(d, "u.log")
        log = respawn.LogFile(path, 100, 3)
        self.addCleanup(log.close)
        log.write(b"a" * 30 + b"\n" + b"b" * 30)        # a line not finished yet
        log.write(b"b" * 50 + b"\nc\n")                  # ... it ends in its file, past maxbytes
        log.write(b"d" * 250 + b"\n")                    # one line longer than maxbytes: alone
        log.write(b"e\n")
        log.write(b"f" * 40 + b"\n" + b"g" * 40 + b"\n" + b"h" * 40 + b"\n")   # two fit, not three
        want = [b"a" * 30 + b"\n" + b"b" * 80 + b"\n",     # dropped: backups = 3
                b"c\n", b"d" * 250 + b"\n", b"e\n" + b"f" * 40 + b"\n" + b"g" * 40 + b"\n",
                b"h" * 40 + b"\n"]
        for name, data in zip([".3", ".2", ".1", ""], want[1:]):
            with open(path + name, "rb") as f:
                self.assertEqual(f.read(), data, name)
        self.assertFalse(os.path.exists(path + ".4"))
        # backups = 0: the file starts over
        z = respawn.LogFile(os.path.join(d, "z.log"), 10, 0)
        self.addCleanup(z.close)
        z.write(b"12345678\nabc\n")
        self.assertEqual(read_text(os.path.join(d, "z.log")), "abc\n")
        self.assertFalse(os.path.exists(os.path.join(d, "z.log.1")))

    def test_sigusr1_reopens_log_files(self):
        sup = core_sup(self, """\
            [program:tick]
            command = {py} {dir}/tick.py
            stdout_logfile = {dir}/tick.log
            startsecs = 0
            """)
        write_file(sup.path("tick.py"), TICKER)
        sup.start()
        log, old = sup.path("tick.log"), sup.path("tick.log.old")
        count = lambda p: read_text(p).count("\n") if os.path.exists(p) else 0
        wait_for(lambda: count(log) >= 5, what="some ticks")
        os.rename(log, old)                 # as logrotate does
        wait_for(lambda: count(old) >= 8, what="ticks into the renamed file")
        self.assertFalse(os.path.exists(log))
        sup.proc.send_signal(signal.SIGUSR1)
        wait_for(lambda: count(log) >= 5, what="ticks in a new file at the original path")
        sup.wait_log("got SIGUSR1: reopening log files")
        self.assertEqual(sup.terminate(), 0)
        before = numbered(read_text(old).splitlines())
        after = numbered(read_text(log).splitlines())
        self.assertEqual(before + after, list(range(len(before) + len(after))))

    def test_rotation_after_the_file_was_renamed_away(self):
        """logrotate renames, then sends USR1: a rotation between the two must not kill us."""
        for backups in (2, 0):
            with self.subTest(backups=backups):
                sup = core_sup(self, """\
                    [program:tick]
                    command = {py} {dir}/tick.py
                    stdout_logfile = {dir}/tick.log
                    stdout_logfile_maxbytes = 100
                    stdout_logfile_backups = %d
                    startsecs = 0
                    """ % backups)
                write_file(sup.path("tick.py"), TICKER)
                sup.start()
                log = sup.path("tick.log")
                wait_for(lambda: os.path.exists(log) and os.path.getsize(log) > 0, what="a tick")
                os.rename(log, sup.path("away.log"))
                # 100 bytes are 8 ticks: past maxbytes the supervisor rotates, then goes on
                wait_for(lambda: supervisor_alive(sup) and os.path.exists(log) and os.path.getsize(log) > 0,
                         what="a new file after a rotation")
                self.assertEqual(sup.svc("tick")["state"], "RUNNING")
                self.assertIsNone(sup.proc.poll())
                self.assertNotIn("Traceback", sup.stderr())
                self.assertEqual(sup.terminate(), 0)

    def _flood(self, target):
        n = 200000                          # 200000 lines of 99 bytes: ~20 MB
        sup = core_sup(self, """\
            [program:flood]
            command = {py} {dir}/flood.py %d {dir}/done
            autorestart = false
            startsecs = 0
            %s
            """ % (n, target))
        write_file(sup.path("flood.py"), FLOOD)
        sup.start()
        wait_for(lambda: os.path.exists(sup.path("done")) and read_text(sup.path("done")),
                 timeout=60, what="the flood to be written")
        sys.stderr.write("[20 MB written in %ss] " % read_text(sup.path("done")))
        sup.wait_state("flood", "EXITED", timeout=60)
        return sup, n

    def test_flood_to_the_supervisor_stdout(self):
        sup, n = self._flood("")
        self.assertEqual(sup.terminate(), 0)
        lines = sup.stdout().splitlines()
        mine = [l for l in lines if l.startswith("flood | ")]
        self.assertEqual(len(mine), n)
        self.assertEqual([int(l[8:17]) for l in mine], list(range(n)))
        self.assertTrue(all(len(l) == 8 + 98 for l in mine))

    def test_flood_to_a_logfile(self):
        sup, n = self._flood("stdout_logfile = {dir}/flood.log")
        with open(sup.path("flood.log"), "rb") as f:
            data = f.read()
        self.assertEqual(data, b"".join(b"%09d %s\n" % (i, b"y" * 88) for i in range(n)))
        self.assertEqual(sup.terminate(), 0)


# ---------------------------------------------------------------------------
# Operating it (issue 4): control socket, every command, one instance, daemon, cron, systemd
# ---------------------------------------------------------------------------

NOBODY = 65534

# A service that prints a numbered line every 50 ms and says when it gets USR1.
# each line one write: print() under -u writes "n", " ", "12", "\n" apart, and a
# file-logged tail read between them ends in a line's head ("n")
CTL_TICKER = """import os, signal, time
signal.signal(signal.SIGUSR1, lambda *a: os.write(1, b"got USR1\\n"))
i = 0
while True:
    os.write(1, b"n %d\\n" % i)
    i += 1
    time.sleep(0.05)
"""


def ticker_program(name, extra=""):
    """A [program:NAME] section running {dir}/ticker.py (see write_ticker)."""
    return ("[program:%s]\ncommand = {py} -u {dir}/ticker.py\nstartsecs = 0.2\nstopwaitsecs = 2\n%s\n"
            % (name, extra))


def write_ticker(sup):
    with open(sup.path("ticker.py"), "w") as f:
        f.write(CTL_TICKER)


def numbers(lines):
    """The counters of CTL_TICKER lines ('n 12' -> 12), in order."""
    return [int(line.split()[1]) for line in lines if re.match(r"^n \d+$", line)]


def log_lines(sup, name, n):
    """A service's last n lines through the protocol, in-process (for polling)."""
    return next(respawn.request(sup.sock, "log", {"name": name, "n": n}))["lines"]


def one_line(test, p, code=1, pattern=None):
    """A client command that failed: exactly one line of output, this exit code."""
    out = (p.stdout + p.stderr).strip()
    test.assertEqual(p.returncode, code, "exit %s, output %r" % (p.returncode, out))
    test.assertEqual(len(out.splitlines()), 1, "want one line, got %r" % out)
    if pattern:
        test.assertRegex(out, pattern)
    return out


class LineReader:
    """Reads a child's stdout in a thread, so a test can wait on lines."""

    def __init__(self, test, proc):
        self.proc, self.lines = proc, []
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()
        test.addCleanup(self.stop)

    def _run(self):
        for line in self.proc.stdout:
            self.lines.append(line.rstrip("\n"))

    def stop(self):
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(10)
        self.thread.join(10)
        self.proc.stdout.close()


def follow(test, sup, name, n=0):
    """`log NAME -n N -f` as a child process whose lines a test can read."""
    proc = subprocess.Popen(respawn_argv(sup.script, ["-c", sup.config, "log", name, "-n", str(n), "-f"]),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=sup.env)
    return LineReader(test, proc)


def supervisors_of(config):
    """PIDs of processes whose command line runs a supervisor on this config."""
    out = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open("/proc/%s/cmdline" % name, "rb") as f:
                args = f.read().decode("utf-8", "replace").split("\0")
        except OSError:
            continue
        if config in args and "run" in args and pid_alive(int(name)):
            out.append(int(name))
    return out


def stop_daemon(pid, service_pids, timeout=15):
    """Cleanup of a daemon we started (not our child): TERM, wait, KILL; then its services."""
    if pid and pid_alive(pid):
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
        try:
            wait_for(lambda: not pid_alive(pid), timeout, "the daemon to exit")
        except AssertionError:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    for p in service_pids:
        kill_group(p)


def as_user(uid, func):
    """Run func() in a forked child with uid/gid `uid` and no groups; (exit code, output).
    The interpreter stays the one running the tests (pyenv's may not load as nobody)."""
    sys.stdout.flush()
    sys.stderr.flush()
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        code = 99
        try:
            os.close(r)
            os.dup2(w, 1)
            os.dup2(w, 2)
            sys.stdout = open(1, "w", closefd=False)     # not a test runner's capture
            sys.stderr = open(2, "w", closefd=False)
            os.setgroups([])
            os.setgid(uid)
            os.setuid(uid)
            code = func()
            sys.stdout.flush()
            sys.stderr.flush()
        except BaseException as exc:     # noqa: B902 - report anything, never return to unittest
            if isinstance(exc, SystemExit) and isinstance(exc.code, int):
                code = exc.code
            else:
                os.write(2, ("child failed: %r\n" % (exc,)).encode())
        finally:
            os._exit(code if isinstance(code, int) else 98)
    os.close(w)
    chunks = []
    while True:
        data = os.read(r, 65536)
        if not data:
            break
        chunks.append(data)
    os.close(r)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status) if hasattr(os, "waitstatus_to_exitcode") \
        else (os.WEXITSTATUS(status) if os.WIFEXITED(status) else -os.WTERMSIG(status)), \
        b"".join(chunks).decode("utf-8", "replace")


# ---------------------------------------------------------------------------
# status
# ---------------------------------------------------------------------------

STATUS_CONFIG = """
[respawn]
watch_self = false

[program:run]
command = sleep 1000
startsecs = 0.2
stopwaitsecs = 2

[program:oneshot]
command = true
autorestart = false
startsecs = 0

[program:badexit]
command = sh -c "exit 3"
autorestart = false
startsecs = 0

[program:fatal]
command = sh -c "exit 1"
startsecs = 1
startretries = 0

[program:backoff]
command = sh -c "exit 1"
startsecs = 1
startretries = forever
backoff = 30
backoff_max = 60

[program:waiting]
command = sleep 1000
requires = fatal

[program:manual]
command = sleep 1000
autostart = false

[program:killed]
command = sleep 1000
autorestart = false
startsecs = 0.2

[program:stopme]
command = sleep 1000
startsecs = 0.2
stopwaitsecs = 2
"""


class TestStatus(unittest.TestCase):
    def setUp(self):
        self.sup = Sup(self, STATUS_CONFIG).start()
        sup = self.sup
        sup.wait_state("run", "RUNNING")
        sup.wait_state("oneshot", "EXITED")
        sup.wait_state("badexit", "EXITED")
        sup.wait_state("fatal", "FATAL")
        sup.wait_state("backoff", "BACKOFF")
        sup.wait_state("killed", "RUNNING")
        sup.wait_state("stopme", "RUNNING")

    def code(self, *names):
        p = self.sup.ctl("status", *names)
        self.assertEqual(p.stderr, "")
        return p.returncode, p.stdout

    def test_status_exit_codes_judge_only_named_services(self):
        sup = self.sup
        code, out = self.code()
        self.assertEqual(code, 3, out)
        # one table line per service: name, state, restarts, then pid/uptime or last exit
        rows = {line.split()[0]: line for line in out.splitlines()}
        self.assertEqual(set(rows), {"run", "oneshot", "badexit", "fatal", "backoff", "waiting",
                                     "manual", "killed", "stopme"}, out)
        self.assertRegex(rows["run"], r"^run\s+RUNNING\s+restarts 0  pid %d, uptime \d+:\d\d:\d\d$"
                         % sup.svc("run")["pid"])
        self.assertRegex(rows["badexit"], r"EXITED\s+restarts \d+  exit 3")
        self.assertRegex(rows["fatal"], r"FATAL\s+restarts \d+  exit 1")
        self.assertRegex(rows["backoff"], r"BACKOFF\s+restarts \d+  .*retry in \d+\.\ds")
        self.assertRegex(rows["waiting"], r"STOPPED\s+restarts \d+  waiting for fatal")
        self.assertRegex(rows["manual"], r"STOPPED\s+restarts \d+  not started")
        # running, a one-shot that exited as expected, one never started: 0
        self.assertEqual(self.code("run", "oneshot", "manual")[0], 0)
        # each kind of "should run but does not": 3, judged alone
        for name in ("badexit", "fatal", "backoff", "waiting"):
            code, out = self.code(name)
            self.assertEqual(code, 3, "%s: %s" % (name, out))
            self.assertEqual(len(out.splitlines()), 1, out)
        self.assertEqual(self.code("run", "fatal")[0], 3)
        # stopped by the operator: 0, and its exit status is minus SIGTERM
        p = sup.ctl("stop", "stopme")
        self.assertEqual((p.returncode, p.stdout.strip()), (0, "stopme: STOPPED"), p.stderr)
        self.assertEqual(self.code("stopme")[0], 0)
        self.assertEqual(sup.svc("stopme")["exitstatus"], -signal.SIGTERM)
        # killed from outside, not to be restarted: EXITED with -9, and that is a 3
        pid = sup.svc("killed")["pid"]
        os.kill(pid, signal.SIGKILL)
        s = sup.wait_state("killed", "EXITED")
        self.assertEqual(s["exitstatus"], -signal.SIGKILL)
        self.assertIsNone(s["pid"])
        code, out = self.code("killed")
        self.assertEqual(code, 3)
        self.assertRegex(out, r"killed\s+EXITED\s+restarts \d+  killed by SIGKILL")
        # an unknown name: one line, exit 1, whether alone or with known ones
        for names in (("nope",), ("run", "nope")):
            out = one_line(self, sup.ctl("status", *names), 1, "nope")
            self.assertIn("no such service", out)
        p = sup.ctl("status", "--json", "nope")
        self.assertEqual((p.returncode, json.loads(p.stdout), p.stderr),
                         (1, {"error": "no such service: nope"}, "no such service: nope\n"))

    def test_status_json_has_the_spec_keys(self):
        sup = self.sup
        before = time.time()
        p = sup.ctl("status", "--json")
        self.assertEqual(p.returncode, 3, p.stderr)
        doc = json.loads(p.stdout)
        s = doc["supervisor"]
        self.assertTrue({"pid", "version", "started", "reexecs", "config"} <= set(s), s)
        self.assertEqual(s["pid"], sup.proc.pid)
        self.assertIsInstance(s["version"], str)
        self.assertEqual(s["version"], respawn.__version__)
        self.assertEqual(s["reexecs"], 0)
        self.assertEqual(s["config"], sup.config)
        self.assertTrue(before - 120 < s["started"] <= before, s)
        keys = {"name", "state", "pid", "started", "uptime", "restarts", "exitstatus", "reason", "ready"}
        svcs = {x["name"]: x for x in doc["services"]}
        for x in svcs.values():
            self.assertTrue(keys <= set(x), x)
            self.assertIsInstance(x["ready"], bool)
        run = svcs["run"]
        self.assertEqual((run["state"], run["ready"], run["exitstatus"], run["reason"]),
                         ("RUNNING", True, None, None))
        self.assertTrue(pid_alive(run["pid"]))
        self.assertTrue(before - 120 < run["started"] <= time.time())
        self.assertGreater(run["uptime"], 0)
        self.assertEqual(run["restarts"], 0)
        manual = svcs["manual"]       # never started: every absent value is null
        self.assertEqual([manual[k] for k in ("pid", "started", "uptime", "exitstatus")],
                         [None] * 4)
        self.assertEqual(manual["state"], "STOPPED")
        self.assertEqual((svcs["badexit"]["exitstatus"], svcs["badexit"]["pid"],
                          svcs["badexit"]["uptime"]), (3, None, None))
        self.assertEqual(svcs["fatal"]["state"], "FATAL")
        self.assertIn("exit 1", svcs["fatal"]["reason"])
        # named: only those, in the order asked; a healthy set exits 0
        p = sup.ctl("status", "--json", "oneshot", "run")
        self.assertEqual(p.returncode, 0, p.stdout)
        self.assertEqual([x["name"] for x in json.loads(p.stdout)["services"]], ["oneshot", "run"])


# ---------------------------------------------------------------------------
# Every command, against a running supervisor, then across a re-exec
# ---------------------------------------------------------------------------

COMMANDS_CONFIG = """
[respawn]
watch_self = false

%s
%s
[program:other]
command = sleep 1000
startsecs = 0.2
stopwaitsecs = 2
priority = 10

[program:broken]
command = sh -c "exit 1"
autostart = false
startsecs = 1
startretries = 0
"""


class TestCommands(unittest.TestCase):
    def make(self):
        sup = Sup(self, COMMANDS_CONFIG % (
            ticker_program("tick"),
            ticker_program("filed", "stdout_logfile = {dir}/filed.log\n")), copy_script=True)
        write_ticker(sup)
        sup.start()
        for name in ("tick", "filed", "other"):
            sup.wait_state(name, "RUNNING")
        return sup

    def ok(self, p, pattern=None):
        self.assertEqual(p.returncode, 0, "stdout %r stderr %r" % (p.stdout, p.stderr))
        if pattern:
            self.assertRegex(p.stdout, pattern)
        return p.stdout

    def exercise(self, sup, after_reexec):
        """start/stop/restart/all, signal, log -n, reload: outputs and exit codes."""
        pids = {n: sup.svc(n)["pid"] for n in ("tick", "filed", "other")}
        self.assertEqual(self.ok(sup.ctl("stop", "tick")), "tick: STOPPED\n")
        self.assertFalse(pid_alive(pids["tick"]))
        self.assertEqual(sup.svc("tick")["state"], "STOPPED")
        self.assertEqual(sup.ctl("status").returncode, 0)   # stopped by the operator
        self.assertEqual(self.ok(sup.ctl("start", "tick")), "tick: RUNNING\n")
        new = sup.svc("tick")
        self.assertEqual(new["state"], "RUNNING")
        self.assertNotEqual(new["pid"], pids["tick"])
        self.assertEqual(self.ok(sup.ctl("restart", "tick", "other")), "tick: RUNNING\nother: RUNNING\n")
        s = sup.status()["services"]
        by = {x["name"]: x for x in s}
        self.assertNotEqual(by["tick"]["pid"], new["pid"])
        self.assertNotEqual(by["other"]["pid"], pids["other"])
        self.assertFalse(pid_alive(new["pid"]) or pid_alive(pids["other"]))
        # all: stop every service, then start the wanted ones again
        broken = sup.svc("broken")["state"]       # STOPPED, or FATAL from the last round
        self.assertEqual(self.ok(sup.ctl("stop", "all")),    # priority, then name
                         "other: STOPPED\nbroken: %s\nfiled: STOPPED\ntick: STOPPED\n" % broken)
        self.assertTrue(all(not x["pid"] for x in sup.status()["services"]))
        out = sup.ctl("start", "all")        # broken fails its start: exit 1, said per service
        self.assertEqual(out.returncode, 1, out.stdout)
        self.assertRegex(out.stderr, r"^broken: ERROR \(FATAL.*\n$")   # errors on stderr
        self.assertNotIn("broken", out.stdout)
        for name in ("tick", "filed", "other"):
            self.assertIn("%s: RUNNING\n" % name, out.stdout)
        # the operator asked for broken and it is FATAL: status says 3 until it is stopped
        self.assertEqual(sup.ctl("status").returncode, 3)
        self.assertEqual(sup.ctl("status", "broken").returncode, 3)
        self.assertEqual(self.ok(sup.ctl("stop", "broken")), "broken: FATAL\n")
        self.assertEqual(sup.ctl("status").returncode, 0)
        before = {x["name"]: x["pid"] for x in sup.status()["services"]}
        out = self.ok(sup.ctl("restart", "tick", "filed", "other"))
        self.assertEqual(sorted(out.splitlines()), ["filed: RUNNING", "other: RUNNING", "tick: RUNNING"])
        after = {x["name"]: x for x in sup.status()["services"]}
        for name in ("tick", "filed", "other"):
            self.assertEqual(after[name]["state"], "RUNNING")
            self.assertNotEqual(after[name]["pid"], before[name])
            self.assertFalse(pid_alive(before[name]))
        one_line(self, sup.ctl("start", "nope"), 1, "no such service: nope")
        one_line(self, sup.ctl("restart", "tick", "nope"), 1, "no such service: nope")
        self.assertEqual(sup.svc("tick")["pid"], after["tick"]["pid"])   # nothing was done
        # signal, once the ticker has installed its USR1 handler (SigCgt): before
        # that, USR1's default action would kill it
        tick_pid = sup.svc("tick")["pid"]

        def catches_usr1():
            with open("/proc/%d/status" % tick_pid) as f:
                caught = [line.split()[1] for line in f if line.startswith("SigCgt:")][0]
            return int(caught, 16) & (1 << (signal.SIGUSR1 - 1))
        wait_for(catches_usr1, what="the ticker's USR1 handler")
        self.assertEqual(self.ok(sup.ctl("signal", "USR1", "tick")), "tick: signalled\n")
        wait_for(lambda: "got USR1" in log_lines(sup, "tick", 50), what="the ticker to log its USR1")
        self.assertEqual(sup.svc("tick")["state"], "RUNNING")
        one_line(self, sup.ctl("signal", "BOGUS", "tick"), 1, "unknown signal")
        one_line(self, sup.ctl("signal", "USR1", "broken"), 1, "not running: broken")
        # log -n: a prefixed service from the memory tail, a file-logged one from its file
        out = self.ok(sup.ctl("log", "tick", "-n", "5")).splitlines()
        self.assertEqual(len(out), 5, out)
        nums = numbers(out)
        self.assertEqual(nums, list(range(nums[0], nums[0] + len(nums))), out)
        wait_for(lambda: len(read_text(sup.path("filed.log")).splitlines()) >= 4, what="filed.log")
        out = self.ok(sup.ctl("log", "filed", "-n", "3")).splitlines()
        with open(sup.path("filed.log")) as f:
            file_lines = f.read().splitlines()
        self.assertEqual(len(out), 3, out)
        self.assertTrue(set(out) <= set(file_lines), (out, file_lines[-5:]))
        self.assertNotIn("filed |", sup.stdout())      # file-logged output is not prefixed
        one_line(self, sup.ctl("log", "nope"), 1, "no such service: nope")
        # reload: an added service starts, the others keep their pids
        kept = {n: sup.svc(n)["pid"] for n in ("tick", "filed", "other")}
        with open(sup.config, "a") as f:
            f.write("\n[program:added%d]\ncommand = sleep 1000\nstartsecs = 0.2\n" % after_reexec)
        self.assertEqual(self.ok(sup.ctl("reload")), "added: added%d\n" % after_reexec)
        sup.wait_state("added%d" % after_reexec, "RUNNING")
        self.assertEqual({n: sup.svc(n)["pid"] for n in kept}, kept)
        self.assertEqual(self.ok(sup.ctl("reload")), "no change\n")
        good = read_text(sup.config)
        with open(sup.config, "a") as f:
            f.write("\n[program:bad]\ncommand = sleep 1\nstartsecs = soon\n")
        p = sup.ctl("reload")
        self.assertEqual((p.returncode, p.stdout), (1, ""), p.stderr)
        self.assertIn("startsecs", p.stderr)
        self.assertIn("config rejected", p.stderr)
        self.assertEqual({n: sup.svc(n)["pid"] for n in kept}, kept)
        # back to the first config: the added service is stopped and removed
        added_pid = sup.svc("added%d" % after_reexec)["pid"]
        with open(sup.config, "w") as f:
            f.write(good.replace("\n[program:added%d]\ncommand = sleep 1000\nstartsecs = 0.2\n"
                                 % after_reexec, ""))
        self.assertEqual(self.ok(sup.ctl("reload")), "removed: added%d\n" % after_reexec)
        wait_for(lambda: "added%d" % after_reexec not in [x["name"] for x in sup.status()["services"]],
                 what="the removed service to go")
        self.assertFalse(pid_alive(added_pid))
        self.assertEqual({n: sup.svc(n)["pid"] for n in kept}, kept)

    def test_every_command_then_again_after_a_reexec(self):
        sup = self.make()
        sup_pid = sup.proc.pid
        self.exercise(sup, 0)
        # reexec: same supervisor pid, services untouched, counted in status
        pids = {x["name"]: x["pid"] for x in sup.status()["services"]}
        last_before = numbers(log_lines(sup, "tick", 1))[0]
        out = self.ok(sup.ctl("reexec"), r"^re-executed: pid %d, version %s \([0-9a-f]{12}\), "
                                         r"handoff [\d.]+ ms\n$" % (sup_pid, re.escape(respawn.__version__)))
        del out
        st = sup.status()
        self.assertEqual((st["supervisor"]["pid"], st["supervisor"]["reexecs"]), (sup_pid, 1))
        self.assertEqual({x["name"]: x["pid"] for x in st["services"]}, pids)
        # the memory tail came across: log -n shows lines from before and after the
        # exec, consecutive (none lost in the exec window, none twice)
        wait_for(lambda: numbers(log_lines(sup, "tick", 1))[0] > last_before + 3,
                 what="new ticker lines after the re-exec")
        nums = numbers(sup.ctl("log", "tick", "-n", "200").stdout.splitlines())
        starts = [i for i in range(1, len(nums)) if nums[i] < nums[i - 1]]
        nums = nums[starts[-1]:] if starts else nums      # this instance's lines only
        self.assertIn(last_before, nums)
        self.assertEqual(nums, list(range(nums[0], nums[0] + len(nums))))
        self.exercise(sup, 1)
        self.assertEqual(sup.status()["supervisor"]["pid"], sup_pid)
        # shutdown: everything stops, the client says so and exits 0, then the supervisor exits 0
        pids = [x["pid"] for x in sup.status()["services"] if x["pid"]]
        self.assertEqual(len(pids), 3)
        self.assertEqual(self.ok(sup.ctl("shutdown")), "stopped\n")
        self.assertEqual([p for p in pids if pid_alive(p)], [])
        self.assertEqual(sup.proc.wait(DEADLINE), 0)
        self.assertFalse(os.path.exists(sup.sock))
        one_line(self, sup.ctl("status"), 1, "no supervisor is running")

    def test_log_follow_prefixed_and_file_and_across_a_reexec(self):
        sup = self.make()
        for name in ("tick", "filed"):
            reader = follow(self, sup, name, n=2)
            wait_for(lambda: len(numbers(reader.lines)) >= 6, what="%s followed lines" % name)
            nums = numbers(reader.lines)
            # the two tail lines then live ones, in order, none twice
            self.assertEqual(nums, sorted(set(nums)), reader.lines[:20])
            self.assertGreater(nums[-1] - nums[0], 4)
            seen = nums[-1]
            self.assertEqual(self.ok(sup.ctl("reexec"))[:12], "re-executed:")
            wait_for(lambda: numbers(reader.lines)[-1] > seen + 10,
                     what="%s lines after the re-exec" % name)
            nums = numbers(reader.lines)
            self.assertEqual(nums, sorted(set(nums)), "a line twice or out of order")
            self.assertIsNone(reader.proc.poll())
            reader.stop()
        self.assertEqual(sup.status()["supervisor"]["reexecs"], 2)
        # a follower ends (exit 0) when the supervisor shuts down
        reader = follow(self, sup, "tick")
        wait_for(lambda: numbers(reader.lines), what="a followed line")
        self.assertEqual(self.ok(sup.ctl("shutdown")), "stopped\n")
        self.assertEqual(reader.proc.wait(DEADLINE), 0)
        self.assertEqual(sup.proc.wait(DEADLINE), 0)

    def test_shutdown_stops_a_service_still_starting(self):
        # A STARTING service used to be marked STOPPED without a signal: shutdown then hung.
        sup = Sup(self, """
            [respawn]
            watch_self = false
            [program:slow]
            command = sleep 1000
            startsecs = 60
            stopwaitsecs = 2
            """).start()
        pid2 = sup.wait_state("slow", "STARTING")["pid"]
        p = sup.ctl("shutdown", timeout=DEADLINE)
        self.assertEqual((p.returncode, p.stdout), (0, "stopped\n"))
        self.assertFalse(pid_alive(pid2))
        self.assertEqual(sup.proc.wait(DEADLINE), 0)


class TestNoSupervisor(unittest.TestCase):
    COMMANDS = (("status",), ("status", "--json"), ("status", "x"), ("start", "x"), ("stop", "all"),
                ("restart", "x"), ("signal", "HUP", "x"), ("reload",), ("reexec",), ("log", "x"),
                ("log", "x", "-f"), ("shutdown",))

    def test_every_client_command_says_so_in_one_line_and_exits_1(self):
        sup = Sup(self, "[program:x]\ncommand = sleep 1000\n")
        # no socket at all, then a stale socket file nobody listens on
        stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        for case in ("missing", "stale"):
            if case == "stale":
                stale.bind(sup.sock)
                stale.close()
                self.assertTrue(stat.S_ISSOCK(os.stat(sup.sock).st_mode))
            procs = [(args, subprocess.Popen(respawn_argv(sup.script, ["-c", sup.config] + list(args)),
                                             stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                             text=True, env=sup.env))
                     for args in self.COMMANDS]        # at once: a slow machine runs them in parallel
            for args, proc in procs:
                out, err = proc.communicate(timeout=60)
                says = "no supervisor is running (nothing answers on %s)" % sup.sock
                # on stderr; with --json, stdout holds the same as an error object
                self.assertEqual((proc.returncode, err), (1, says + "\n"), (case, args))
                if "--json" in args:
                    self.assertEqual(json.loads(out), {"error": says}, (case, args))
                else:
                    self.assertEqual(out, "", (case, args))


# ---------------------------------------------------------------------------
# Socket security: modes, and SO_PEERCRED refusing another user
# ---------------------------------------------------------------------------

class TestSocketSecurity(unittest.TestCase):
    def test_modes_and_another_user_is_refused(self):
        if os.geteuid() != 0:
            self.skipTest("needs root to run a client as nobody (uid %d)" % NOBODY)
        sup = Sup(self, "[respawn]\nwatch_self = false\n[program:x]\ncommand = sleep 1000\n")
        # the socket in a folder of its own, created by the supervisor; a second
        # folder that already exists with 0755 is tightened to 0700
        sock = sup.path("run", "x.sock")
        loose = sup.path("loose")
        os.mkdir(loose, 0o755)
        os.chmod(loose, 0o755)
        text = read_text(sup.config).replace("socket = %s" % sup.sock, "socket = %s" % sock)
        with open(sup.config, "w") as f:
            f.write(text)
        sup.sock = sock
        sup.start()
        pid = sup.wait_state("x", "RUNNING")["pid"]
        self.assertEqual(stat.S_IMODE(os.stat(sup.path("run")).st_mode), 0o700)
        self.assertEqual(stat.S_IMODE(os.stat(sock).st_mode), 0o600)
        self.assertTrue(stat.S_ISSOCK(os.stat(sock).st_mode))
        # now open every door in the file system, so that only SO_PEERCRED stands
        for d in (sup.dir, sup.path("run")):
            os.chmod(d, 0o711)
        os.chmod(sup.config, 0o644)
        os.chmod(sock, 0o666)
        code, out = as_user(NOBODY, lambda: respawn.main(["-c", sup.config, "status"]))
        self.assertEqual(code, 1, out)
        self.assertEqual(out.strip(), "permission denied: uid %d is neither root nor the supervisor's user"
                         % NOBODY)
        # the same for a command that would change something: nothing changes
        code, out = as_user(NOBODY, lambda: respawn.main(["-c", sup.config, "stop", "x"]))
        self.assertEqual(code, 1, out)
        self.assertIn("permission denied", out)
        self.assertEqual((sup.svc("x")["pid"], sup.svc("x")["state"]), (pid, "RUNNING"))
        # raw protocol as nobody: the refusal is the server's answer, after a successful connect
        def raw():
            replies = list(respawn.request(sock, "shutdown"))
            print(json.dumps(replies))
            return 0
        code, out = as_user(NOBODY, raw)
        self.assertEqual(code, 0, out)
        replies = json.loads(out)
        self.assertEqual(len(replies), 1, replies)
        self.assertFalse(replies[0]["ok"])
        self.assertIn("uid %d" % NOBODY, replies[0]["error"])
        # and our own user is served through the very same open doors
        self.assertEqual(sup.ctl("status").returncode, 0)
        self.assertIsNone(sup.proc.poll())

    def test_daemon_says_why_it_cannot_start_and_exits_1(self):
        """The socket folder belongs to another user: run --daemon says why in one line, exit 1."""
        if os.geteuid() != 0:
            self.skipTest("needs root to make a folder belong to uid %d" % NOBODY)
        sup = Sup(self, "[respawn]\nwatch_self = false\n[program:x]\ncommand = sleep 1000\n")
        theirs = sup.path("theirs")
        os.mkdir(theirs, 0o700)
        os.chown(theirs, NOBODY, NOBODY)
        text = read_text(sup.config).replace("socket = %s" % sup.sock,
                                               "socket = %s/x.sock\nlogfile = %s/d.log"
                                               % (theirs, sup.dir))
        with open(sup.config, "w") as f:
            f.write(text)
        p = subprocess.run([PY, SCRIPT, "-c", sup.config, "run", "--daemon"], stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, text=True, timeout=60, env=sup.env)
        self.assertEqual(p.returncode, 1, p.stdout + p.stderr)
        self.assertEqual(p.stdout, "")
        self.assertEqual(len(p.stderr.strip().splitlines()), 1, p.stderr)
        self.assertIn("belongs to uid %d" % NOBODY, p.stderr)
        self.assertEqual(supervisors_of(sup.config), [])


# ---------------------------------------------------------------------------
# Stale socket and pidfile; one supervisor per config
# ---------------------------------------------------------------------------

class TestStaleAndSingle(unittest.TestCase):
    def test_stale_socket_and_pidfile_after_a_sigkill(self):
        sup = Sup(self, """
            [respawn]
            watch_self = false
            pidfile = {dir}/sup.pid
            [program:x]
            command = sleep 1000
            startsecs = 0.2
            """)
        with open(sup.path("sup.pid"), "w") as f:
            f.write("999999999\n")                   # a stale pidfile is overwritten
        sup.start()
        first = sup.proc.pid
        with open(sup.path("sup.pid")) as f:
            self.assertEqual(f.read(), "%d\n" % first)
        old_pid = sup.wait_state("x", "RUNNING")["pid"]
        self.addCleanup(kill_group, old_pid)
        sup.proc.send_signal(signal.SIGKILL)
        sup.proc.wait(DEADLINE)
        kill_group(old_pid)                          # the orphan service, by its recorded group
        wait_for(lambda: not pid_alive(old_pid), what="the orphan to die")
        self.assertTrue(stat.S_ISSOCK(os.stat(sup.sock).st_mode), "the stale socket is left")
        self.assertTrue(os.path.exists(sup.path("sup.pid")))
        one_line(self, sup.ctl("status"), 1, "no supervisor is running")
        sup.out.close()                              # Sup.start opens them again
        sup.err.close()
        sup.start()
        second = sup.proc.pid
        self.assertNotEqual(second, first)
        p = sup.ctl("status", "--json")
        self.assertEqual(p.returncode, 0, p.stderr)
        self.assertEqual(json.loads(p.stdout)["supervisor"]["pid"], second)
        new_pid = sup.wait_state("x", "RUNNING")["pid"]
        self.assertNotEqual(new_pid, old_pid)
        with open(sup.path("sup.pid")) as f:
            self.assertEqual(f.read(), "%d\n" % second)
        self.assertEqual(sup.terminate(), 0)
        self.assertFalse(os.path.exists(sup.path("sup.pid")), "the pidfile is removed at exit")

    def test_second_run_says_already_running_and_exits_0(self):
        sup = Sup(self, "[respawn]\nwatch_self = false\n[program:x]\ncommand = sleep 1000\nstartsecs = 0.2\n")
        sup.start()
        pid = sup.wait_state("x", "RUNNING")["pid"]
        p = subprocess.run([PY, SCRIPT, "-c", sup.config, "run"], stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, text=True, timeout=60, env=sup.env, cwd=sup.dir)
        self.assertEqual((p.returncode, p.stdout, p.stderr),
                         (0, "already running (pid %d)\n" % sup.proc.pid, ""))
        self.assertIsNone(sup.proc.poll())
        st = sup.status()
        self.assertEqual(st["supervisor"]["pid"], sup.proc.pid)
        self.assertEqual(sup.svc("x")["pid"], pid)
        self.assertEqual(supervisors_of(sup.config), [sup.proc.pid])


# ---------------------------------------------------------------------------
# Daemon mode and cron
# ---------------------------------------------------------------------------

DAEMON_CONFIG = """
[respawn]
watch_self = false
pidfile = {dir}/d.pid
logfile = {dir}/d.log

[program:x]
command = sh -c "echo hello from x; exec sleep 1000"
startsecs = 0.2
"""


class TestDaemon(unittest.TestCase):
    def daemon_cleanup(self, sup):
        recorded = set()

        def record():
            daemons = set(supervisors_of(sup.config))
            try:
                for s in respawn.request(sup.sock, "status", timeout=5):
                    recorded.update(x["pid"] for x in s.get("services", ()) if x["pid"])
                    daemons.add(s["supervisor"]["pid"])
                    break
            except (OSError, ValueError, KeyError, respawn.NoSupervisor):
                pass
            # a daemon started with relative paths is not found by its command line:
            # the lock file names the supervisor holding it
            try:
                with open(respawn.lock_path(sup.config)) as f:
                    holder = int(f.read().split("\n")[0] or 0)
                with open("/proc/%d/cmdline" % holder, "rb") as f:
                    if b"respawn" in f.read():
                        daemons.add(holder)
            except (OSError, ValueError):
                pass
            for pid in daemons:
                stop_daemon(pid, ())
            for pid in recorded:
                kill_group(pid)
        self.addCleanup(record)
        return recorded

    def run_daemon(self, sup, cmd=None, **kw):
        cmd = cmd or [PY, sup.script, "-c", sup.config, "run", "--daemon"]
        return subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              timeout=60, **kw)

    def test_daemon_starts_answers_writes_pidfile_and_is_single(self):
        sup = Sup(self, DAEMON_CONFIG)
        self.daemon_cleanup(sup)
        # started from a shell in a session of its own, which then goes away
        shell = subprocess.Popen(["sh", "-c", '"$0" "$1" -c "$2" run --daemon 2>&1; echo shell-done; '
                                  'exec sleep 1000', PY, sup.script, sup.config], stdout=subprocess.PIPE,
                                 text=True, start_new_session=True, env=sup.env)
        self.addCleanup(kill_group, shell.pid)
        reader = LineReader(self, shell)
        wait_for(lambda: "shell-done" in reader.lines, what="run --daemon to return")
        self.assertEqual(len(reader.lines), 2, reader.lines)
        m = re.match(r"^started \(pid (\d+)\); its log: %s$" % re.escape(sup.path("d.log")), reader.lines[0])
        self.assertTrue(m, reader.lines)
        pid = int(m.group(1))
        # it returned only once the supervisor answers: no waiting here
        st = next(respawn.request(sup.sock, "status", timeout=10))
        self.assertEqual(st["supervisor"]["pid"], pid)
        with open(sup.path("d.pid")) as f:
            self.assertEqual(f.read(), "%d\n" % pid)
        os.killpg(shell.pid, signal.SIGKILL)         # the calling shell and its group die
        shell.wait(DEADLINE)
        self.assertTrue(pid_alive(pid))
        # stdio away from the terminal: stdin is /dev/null, stdout and stderr the logfile
        self.assertEqual(os.readlink("/proc/%d/fd/0" % pid), os.devnull)
        for fd in (1, 2):
            self.assertEqual(os.readlink("/proc/%d/fd/%d" % (pid, fd)), sup.path("d.log"))
        self.assertNotEqual(os.getsid(pid), os.getsid(0))
        self.assertNotEqual(os.getsid(pid), shell.pid)
        self.assertEqual(sup.ctl("status").returncode, 0)
        # its own log and its services' prefixed lines go to the logfile
        wait_for(lambda: "x | hello from x" in read_text(sup.path("d.log")), what="the daemon's log")
        self.assertIn("supervising 1 service from", read_text(sup.path("d.log")))
        # cron keep-alive: run --daemon again (twice at once, as two cron lines could)
        procs = [subprocess.Popen([PY, sup.script, "-c", sup.config, "run", "--daemon"],
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=sup.env)
                 for _ in range(2)]
        for p in procs:
            out, err = p.communicate(timeout=60)
            self.assertEqual((p.returncode, out, err), (0, "already running (pid %d)\n" % pid, ""))
        wait_for(lambda: supervisors_of(sup.config) == [pid], what="exactly one supervisor")
        self.assertEqual(sup.svc("x")["restarts"], 0)
        # shutdown: the pidfile goes with it
        self.assertEqual(sup.ctl("shutdown").stdout, "stopped\n")
        wait_for(lambda: not pid_alive(pid), what="the daemon to exit")
        self.assertFalse(os.path.exists(sup.path("d.pid")))
        self.assertIn("every service is stopped; exiting", read_text(sup.path("d.log")))

    def test_two_daemons_racing_leave_one_supervisor(self):
        sup = Sup(self, DAEMON_CONFIG)
        self.daemon_cleanup(sup)
        procs = [subprocess.Popen([PY, sup.script, "-c", sup.config, "run", "--daemon"],
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=sup.env)
                 for _ in range(3)]
        outs = []
        for p in procs:
            out, err = p.communicate(timeout=60)
            self.assertEqual((p.returncode, err), (0, ""), out)
            outs.append(out)
        started = [o for o in outs if o.startswith("started")]
        self.assertEqual(len(started), 1, outs)
        pid = int(re.match(r"started \(pid (\d+)\)", started[0]).group(1))
        for o in outs:
            if o not in started:
                self.assertRegex(o, r"^already running \(pid \S+\)\n$")
        wait_for(lambda: supervisors_of(sup.config) == [pid], what="exactly one supervisor")
        self.assertEqual(sup.status()["supervisor"]["pid"], pid)

    def test_cron_like_environment_relative_script_then_reexec(self):
        sup = Sup(self, DAEMON_CONFIG)
        self.daemon_cleanup(sup)
        # the script beside the config, named relative to a cwd elsewhere
        os.mkdir(sup.path("app"))
        shutil.copy(SCRIPT, sup.path("app", "respawn.py"))
        sup.script = sup.path("app", "respawn.py")
        cwd = tempfile.mkdtemp(prefix="respawn-cron-")
        self.addCleanup(shutil.rmtree, cwd, True)
        rel_script = os.path.relpath(sup.script, cwd)
        rel_config = os.path.relpath(sup.config, cwd)
        self.assertFalse(os.path.isabs(rel_script))
        p = self.run_daemon(sup, ["env", "-i", "PATH=/usr/bin:/bin", PY, rel_script, "-c", rel_config,
                                  "run", "--daemon"], cwd=cwd)
        self.assertEqual(p.returncode, 0, p.stdout + p.stderr)
        pid = int(re.match(r"^started \(pid (\d+)\); its log: %s\n$" % re.escape(sup.path("d.log")),
                           p.stdout).group(1))
        xpid = sup.wait_state("x", "RUNNING")["pid"]
        with open("/proc/%d/environ" % pid, "rb") as f:
            self.assertNotIn(b"HOME=", f.read())       # it really runs with cron's bare env
        self.assertEqual(os.readlink("/proc/%d/cwd" % pid), "/")
        p = sup.ctl("reexec")
        self.assertEqual(p.returncode, 0, p.stdout + p.stderr)
        self.assertRegex(p.stdout, r"^re-executed: pid %d," % pid)
        st = sup.status()
        self.assertEqual((st["supervisor"]["pid"], st["supervisor"]["reexecs"]), (pid, 1))
        self.assertEqual(sup.svc("x")["pid"], xpid)
        with open("/proc/%d/cmdline" % pid, "rb") as f:
            self.assertIn(sup.script.encode() + b"\0", f.read())   # the absolute path
        # a second cron run, same relative names, same bare env: still one supervisor
        p = self.run_daemon(sup, ["env", "-i", "PATH=/usr/bin:/bin", PY, rel_script, "-c", rel_config,
                                  "run", "--daemon"], cwd=cwd)
        self.assertEqual((p.returncode, p.stdout), (0, "already running (pid %d)\n" % pid))
        self.assertEqual(supervisors_of(sup.config), [pid])


# ---------------------------------------------------------------------------
# systemd: READY=1 on $NOTIFY_SOCKET
# ---------------------------------------------------------------------------

class TestSystemdNotify(unittest.TestCase):
    def check_ready(self, sup, listener, address):
        sup.env["NOTIFY_SOCKET"] = address
        sup.start(wait=False)
        listener.settimeout(DEADLINE)
        fields = {}
        while "READY" not in fields:       # STATUS= lines may come first (issue 14)
            try:
                data = listener.recv(4096).decode()
            except socket.timeout:
                self.fail("no READY=1 within %ss; stderr:\n%s" % (DEADLINE, sup.stderr()))
            fields = dict(line.split("=", 1) for line in data.splitlines() if "=" in line)
        self.assertEqual(fields.get("READY"), "1", data)
        self.assertEqual(fields.get("MAINPID"), str(sup.proc.pid), data)
        # sent once its services are started: they have pids by then
        st = sup.status()
        self.assertTrue(all(x["pid"] for x in st["services"]), st)
        # the service does not inherit systemd's socket (it would speak in our name)
        wait_for(lambda: "env | NOTIFY_SOCKET=" in sup.stdout(), what="the service's env line",
                 )
        self.assertIn("env | NOTIFY_SOCKET=None\n", sup.stdout())

    CONFIG = ("[respawn]\nwatch_self = false\n[program:env]\ncommand = {py} -c \"import os,time; "
              "print('NOTIFY_SOCKET=%%s' %% os.environ.get('NOTIFY_SOCKET'), flush=True); time.sleep(1000)\"\n"
              "startsecs = 0.2\n")

    def test_ready_on_a_path_socket(self):
        sup = Sup(self, self.CONFIG)
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.addCleanup(listener.close)
        path = sup.path("notify.sock")
        listener.bind(path)
        self.check_ready(sup, listener, path)

    def test_ready_on_an_abstract_socket(self):
        sup = Sup(self, self.CONFIG)
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.addCleanup(listener.close)
        name = "respawn-test-notify-%d-%d" % (os.getpid(), time.monotonic_ns() if hasattr(
            time, "monotonic_ns") else int(time.monotonic() * 1e9))
        listener.bind("\0" + name)
        self.check_ready(sup, listener, "@" + name)


# ---------------------------------------------------------------------------
# Slow and hostile clients do not stall supervision
# ---------------------------------------------------------------------------

class TestHostileClients(unittest.TestCase):
    def test_silent_and_oversized_clients(self):
        sup = Sup(self, """
            [respawn]
            watch_self = false
            [program:victim]
            command = sleep 1000
            startsecs = 0.2
            """).start()
        pid = sup.wait_state("victim", "RUNNING")["pid"]
        # many connect and say nothing, one sends half a line and stalls
        silent = []
        for _ in range(20):
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.connect(sup.sock)
            silent.append(s)
            self.addCleanup(s.close)
        silent[0].sendall(b'{"v": 1, "cmd": "sta')
        # one sends 1 MB without a newline, as fast as the supervisor takes it
        big = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.addCleanup(big.close)
        big.connect(sup.sock)
        big.setblocking(False)
        payload, sent = b"x" * (1 << 20), 0
        sel = selectors.DefaultSelector()
        self.addCleanup(sel.close)
        sel.register(big, selectors.EVENT_READ | selectors.EVENT_WRITE)
        answer = b""
        deadline = time.monotonic() + DEADLINE
        while b"\n" not in answer and time.monotonic() < deadline:
            for key, mask in sel.select(1):
                if mask & selectors.EVENT_WRITE and sent < len(payload):
                    try:
                        sent += big.send(payload[sent:sent + 65536])
                    except (BlockingIOError, BrokenPipeError, ConnectionResetError):
                        pass
                if mask & selectors.EVENT_READ:
                    try:
                        chunk = big.recv(4096)
                    except (BlockingIOError, ConnectionResetError):
                        chunk = b""
                    answer += chunk
                    if not chunk:
                        sel.unregister(big)
                        break
            if not sel.get_map():
                break
        self.assertIn(b'"request too large"', answer)
        # while the silent ones hang on: status answers, a killed service comes back
        p = sup.ctl("status")
        self.assertEqual(p.returncode, 0, p.stdout + p.stderr)
        os.kill(pid, signal.SIGKILL)
        new = sup.wait_pid_change("victim", pid)
        self.assertNotEqual(new["pid"], pid)
        p = sup.ctl("status", "victim")
        self.assertEqual(p.returncode, 0)
        self.assertIn("pid %d" % new["pid"], p.stdout)
        # a request that is not JSON gets an error line, not a hang
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(DEADLINE)
            s.connect(sup.sock)
            s.sendall(b"hello\n")
            reply = json.loads(s.makefile("rb").readline())
        self.assertFalse(reply["ok"])
        self.assertIn("bad request", reply["error"])
        self.assertIsNone(sup.proc.poll())


# ---------------------------------------------------------------------------
# The loader that runs a supervisor from precompiled code
# ---------------------------------------------------------------------------

class TestMemfd(unittest.TestCase):
    """The handoff channel: a memfd, or an unlinked temporary file where the
    kernel has no memfd_create (before Linux 3.17) or it is forbidden."""

    def check(self, fd, data):
        self.addCleanup(os.close, fd)
        self.assertEqual(os.lseek(fd, 0, os.SEEK_CUR), 0, "not rewound")
        self.assertEqual(os.pread(fd, len(data) + 1, 0), data)
        self.assertEqual(os.fstat(fd).st_nlink, 0, "the file has a name someone could open")
        self.assertFalse(os.get_inheritable(fd))

    def test_memfd(self):
        data = b"state" * 1000
        fd = respawn.memfd("respawn-test", data)
        self.check(fd, data)
        self.assertTrue(os.readlink("/proc/self/fd/%d" % fd).startswith("/memfd:respawn-test"))

    def test_temporary_file_where_memfd_create_fails(self):
        from unittest import mock
        data = b"rollback" * 1000
        with mock.patch.object(os, "memfd_create", side_effect=OSError(errno.ENOSYS, "not here")):
            fd = respawn.memfd("respawn-test", data)
        self.check(fd, data)
        self.assertFalse(os.readlink("/proc/self/fd/%d" % fd).startswith("/memfd:"))


class TestLoader(unittest.TestCase):
    """The memfd loader runs marshalled code only on the interpreter that made it;
    another Python version (sys.executable upgraded under us) compiles the source."""

    def run_loader(self, exe):
        src = (b"import sys\nprint('ran', sys.version_info[0], sys.version_info[1], sys.argv[1])\n"
               # the loader keeps no copy of the memfd's bytes beside the code it runs
               b"assert not {'d', 'k'} & set(vars(sys.modules['__main__'])), 'loader kept its buffers'\n")
        code = compile(src, "/nonexistent/respawn.py", "exec")
        argv, fd = respawn.loader_argv(code, src, ["/nonexistent/respawn.py", "arg"])
        self.addCleanup(os.close, fd)
        argv[0] = exe
        return subprocess.run(argv, pass_fds=[fd], stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True, timeout=60)

    def test_same_interpreter_runs_the_code(self):
        p = self.run_loader(PY)
        self.assertEqual(p.stdout.strip(), "ran %d %d arg" % sys.version_info[:2], p.stdout)

    def test_another_python_version_compiles_the_source(self):
        others = [os.path.expanduser("~/.pyenv/versions/%s/bin/python" % v)
                  for v in sorted(os.listdir(os.path.expanduser("~/.pyenv/versions")))
                  if v.startswith("3.")] if os.path.isdir(os.path.expanduser("~/.pyenv/versions")) else []
        others = [o for o in others if os.access(o, os.X_OK) and subprocess.run(
            [o, "-c", "import sys; sys.exit(sys.version_info[:2] == (%d, %d) or sys.version_info < (3, 8))"
             % sys.version_info[:2]]).returncode == 0]
        if not others:
            self.skipTest("no other CPython 3.8+ on this machine to play the upgraded interpreter")
        p = self.run_loader(others[0])
        self.assertRegex(p.stdout.strip(), r"^ran 3 \d+ arg$", p.stdout)
        self.assertNotEqual(p.stdout.strip(), "ran %d %d arg" % sys.version_info[:2])


class TestCommandLine(unittest.TestCase):
    """The command line of SPEC.md, parsed by hand (no argparse in a supervisor)."""

    def cli(self, *words):
        return subprocess.run(respawn_argv(SCRIPT, words), stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, timeout=60)

    def test_every_command_parses_to_its_arguments(self):
        parse = respawn.parse_args
        self.assertEqual(parse([]).command, "run")
        self.assertFalse(parse([]).daemon)
        self.assertTrue(parse(["run", "--daemon"]).daemon)
        a = parse(["-c", "x.ini", "status", "web", "--json", "db"])
        self.assertEqual((a.config, a.command, a.names, a.json), ("x.ini", "status", ["web", "db"], True))
        self.assertEqual(parse(["--config=y.ini", "check"]).config, "y.ini")
        self.assertEqual(parse(["-cz.ini", "reload"]).config, "z.ini")
        self.assertEqual(parse(["--conf", "w.ini", "reexec"]).config, "w.ini")   # a unique prefix
        self.assertEqual(parse(["stop", "all"]).names, ["all"])
        a = parse(["signal", "HUP", "web", "db"])
        self.assertEqual((a.sig, a.names), ("HUP", ["web", "db"]))
        a = parse(["log", "web", "-n", "5", "-f"])
        self.assertEqual((a.name, a.n, a.follow), ("web", 5, True))
        a = parse(["log", "-n7", "--follow", "web"])
        self.assertEqual((a.name, a.n, a.follow), ("web", 7, True))
        self.assertEqual(parse(["log", "web"]).n, 20)
        self.assertEqual(parse(["start", "--", "-odd"]).names, ["-odd"])
        a = parse(["--handoff", "5", "--rollback", "6", "--script", "/x/respawn.py", "-c", "c", "run"])
        self.assertEqual((a.handoff, a.rollback, a.script), (5, 6, "/x/respawn.py"))
        self.assertEqual(parse(["--handoff-selftest", "s.json", "check", "--trial"]).handoff_selftest, "s.json")

    def test_mistakes_get_one_line_and_exit_2(self):
        for words, says in [
                (["statsu"], "unknown command 'statsu' (did you mean 'status'?)"),
                (["status", "--jsno"], "unknown option --jsno for status (did you mean '--json'?)"),
                (["--daemon"], "unknown option --daemon"),
                (["stop"], "stop needs one or more service names"),
                (["signal", "TERM"], "signal needs a signal and one or more service names"),
                (["log"], "log needs a service name"),
                (["log", "a", "b"], "log takes one service name, not a b"),
                (["log", "a", "-n", "x"], "-n takes a number, not 'x'"),
                (["log", "a", "-n", "-3"], "-n takes a number of 0 or more"),
                (["log", "a", "-n", "\u0663"], "-n takes a number, not '\u0663'"),
                (["log", "a", "-n", "1_0"], "-n takes a number, not '1_0'"),
                (["log", "a", "-n", "9" * 5000], "-n takes a number, not '999"),
                (["log", "a", "-n", "10" + "0" * 20], "-n takes a number up to "),
                (["reload", "now"], "reload takes no arguments, not now"),
                (["-c"], "-c needs a value"),
                (["run", "--daemon=yes"], "--daemon takes no value")]:
            with self.subTest(words=words):
                p = self.cli(*words)
                self.assertEqual(p.returncode, 2, p.stderr)
                self.assertEqual(p.stdout, "")
                self.assertEqual(len(p.stderr.splitlines()), 1, p.stderr)
                self.assertIn("respawn.py: " + says, p.stderr)
                self.assertNotIn("Traceback", p.stderr)

    def test_help_lists_every_command_and_version_prints_it(self):
        p = self.cli("--help")
        self.assertEqual(p.returncode, 0)
        for command in ("run [--daemon]", "check", "status [NAME...] [--json]", "start|stop|restart NAME...",
                        "signal SIG NAME...", "reload", "reexec", "log NAME [-n N] [-f]", "shutdown",
                        "-c, --config FILE"):
            self.assertIn(command, p.stdout)
        status = self.cli("status", "-h")           # one command's own usage
        self.assertEqual(status.returncode, 0)
        self.assertTrue(status.stdout.startswith("usage: respawn.py [-c FILE] status [NAME...] [--json]\n"),
                        status.stdout)
        p = self.cli("--version")
        self.assertEqual((p.returncode, p.stdout), (0, "respawn.py %s\n" % respawn.__version__))


class TestLean(unittest.TestCase):
    """What the supervisor leaves out to stay small at rest (bench/ measures the
    memory; this checks the causes): no OpenSSL, no shutil, no random, no argparse."""

    def test_sha256_is_hashlibs(self):
        import hashlib
        for data in (b"", b"x", bytes(range(256)) * 1000):
            self.assertEqual(respawn.sha256(data).hexdigest(), hashlib.sha256(data).hexdigest())

    def test_uniform_draws_spread_over_zero_to_one(self):
        draws = [respawn.uniform() for _ in range(2000)]
        self.assertTrue(all(0.0 <= x < 1.0 for x in draws))
        self.assertLess(min(draws), 0.05)
        self.assertGreater(max(draws), 0.95)

    def test_which_finds_executables_in_path_order(self):
        folder = tempfile.mkdtemp(prefix="respawn-which-")
        self.addCleanup(shutil.rmtree, folder, True)
        first, second = os.path.join(folder, "a"), os.path.join(folder, "b")
        os.makedirs(os.path.join(second, "tool"))      # a folder is not a command
        for where, mode in ((first, 0o644), (second, 0o755)):
            os.makedirs(where, exist_ok=True)
            with open(os.path.join(where, "prog"), "w") as f:
                f.write("#!/bin/sh\n")
            os.chmod(os.path.join(where, "prog"), mode)
        path = os.pathsep.join([first, second])
        self.assertEqual(respawn.which("prog", path), os.path.join(second, "prog"))
        self.assertIsNone(respawn.which("tool", path))
        self.assertIsNone(respawn.which("missing", path))
        os.chmod(os.path.join(first, "prog"), 0o755)
        self.assertEqual(respawn.which("prog", path), os.path.join(first, "prog"))

    def test_a_running_supervisor_maps_no_openssl_or_compression_library(self):
        sup = core_sup(self, """\
            [program:bare]
            command = sleep 1000
            startsecs = 0
            """)
        sup.start()
        sup.wait_state("bare", "RUNNING")
        sup.ctl("reload")         # reload reads the config and checks commands again
        with open("/proc/%d/maps" % sup.proc.pid) as f:
            maps = f.read()
        for library in ("libcrypto", "_hashlib", "_bz2", "_lzma", "_random"):
            self.assertNotIn(library, maps)
        self.assertEqual(sup.terminate(), 0)


# ---------------------------------------------------------------------------
# Re-execution and reload (issue 3)
# ---------------------------------------------------------------------------

# ---------------------------------------------------------------------------
# Re-execution: helpers
# ---------------------------------------------------------------------------

HAS_PIDFD = respawn.pidfds_work()


def with_version(text, version):
    new, n = re.subn(r'^__version__ = "[^"]*"', '__version__ = "%s"' % version, text, count=1, flags=re.M)
    assert n == 1, "no __version__ line to change"
    return new


def patched(text, old, new):
    """text with `old` replaced once by `new`; the test fails if `old` is missing."""
    assert text.count(old) == 1, "%r is not in respawn.py exactly once" % old
    return text.replace(old, new, 1)


def after_version(text, code):
    """Code run at import time, right after the __version__ line."""
    return re.sub(r'^(__version__ = "[^"]*"\n)', lambda m: m.group(1) + code, text, count=1, flags=re.M)


def slow_trial(text, seconds=0.8):
    """New code whose trial check takes a while (the real run is not slowed)."""
    return after_version(text, 'import sys as _s, time as _t\n'
                               'if "--handoff-selftest" in _s.argv: _t.sleep(%g)\n' % seconds)


def install_by_rename(path, text, mode=0o644):
    """What editors, `cp` + `mv` and package tools do: a new inode renamed over the file."""
    tmp = path + ".new"
    with open(tmp, "w") as f:
        f.write(text)
    os.chmod(tmp, mode)
    os.rename(tmp, path)


def install_in_place(path, text):
    """An in-place rewrite: same inode, truncated then written."""
    with open(path, "w") as f:
        f.write(text)


def ctl_with(script, sup, *args):
    """A client command run by another copy of respawn.py than the supervisor's."""
    return subprocess.run(respawn_argv(script, ["-c", sup.config] + list(args)), stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True, timeout=60, env=sup.env)


def cmdline(pid):
    with open("/proc/%d/cmdline" % pid, "rb") as f:
        return f.read().split(b"\0")[:-1]


def rx_proc_status(pid, field):
    with open("/proc/%d/status" % pid) as f:
        for line in f:
            if line.startswith(field + ":"):
                return line.split(":", 1)[1].strip()
    raise AssertionError("no %s in /proc/%d/status" % (field, pid))


def fds_of(pid):
    return sorted(int(n) for n in os.listdir("/proc/%d/fd" % pid))


def fds_but_held(pid):
    """fds_of a service without the copies of its own pipes' read ends it holds
    (issue 11: at 10 or above, the same pipes as its stdout and stderr)."""
    fds = {}
    for n in os.listdir("/proc/%d/fd" % pid):
        try:
            fds[int(n)] = os.readlink("/proc/%d/fd/%s" % (pid, n))
        except OSError:
            pass
    own = {fds.get(1), fds.get(2)}
    return sorted(fd for fd, target in fds.items()
                  if not (fd >= 10 and target.startswith("pipe:") and target in own))


def epoll_watch(pid):
    """The fds each epoll instance of pid watches, from the kernel: {epoll fd: [fds]}."""
    out = {}
    for fd, what in fd_map(pid).items():
        if what == "anon_inode:[eventpoll]":
            with open("/proc/%d/fdinfo/%d" % (pid, fd)) as f:
                out[fd] = sorted(int(line.split()[1]) for line in f if line.startswith("tfd:"))
    return out


def not_cloexec(pid):
    """pid's fds above 2 that an exec would pass on (no O_CLOEXEC in fdinfo's flags)."""
    out = []
    for fd in fd_map(pid):
        try:
            with open("/proc/%d/fdinfo/%d" % (pid, fd)) as f:
                flags = int(f.read().split("flags:")[1].split()[0], 8)
        except (OSError, IndexError):
            continue
        if fd > 2 and not flags & 0o2000000:
            out.append(fd)
    return out


def fd_map(pid):
    """{fd: what it is} (pipe and socket inode numbers dropped: they change)."""
    out = {}
    for n in os.listdir("/proc/%d/fd" % pid):
        try:
            out[int(n)] = re.sub(r"\[\d+\]", "", os.readlink("/proc/%d/fd/%s" % (pid, n)))
        except OSError:
            pass
    return out


def fd_targets(pid):
    out = []
    for n in os.listdir("/proc/%d/fd" % pid):
        try:
            out.append(os.readlink("/proc/%d/fd/%s" % (pid, n)))
        except OSError:
            pass
    return out


def rx_children_of(ppid):
    """(pid, cmdline bytes) of the live processes whose parent is ppid."""
    out = []
    # The kernel's own list is one read: a scan of all of /proc on a busy machine
    # can take longer than a child lives (a trial check lasts ~0.1 s).
    try:
        kids = set()
        for task in os.listdir("/proc/%d/task" % ppid):
            with open("/proc/%d/task/%s/children" % (ppid, task)) as f:
                kids.update(f.read().split())
        names = sorted(kids)
    except OSError:
        names = os.listdir("/proc")
    for name in names:
        if not name.isdigit():
            continue
        try:
            with open("/proc/%s/stat" % name) as f:
                fields = f.read().rsplit(")", 1)[1].split()
            if int(fields[1]) != ppid:
                continue
            out.append((int(name), b" ".join(cmdline(int(name)))))
        except (OSError, IndexError):
            continue
    return out


def proc_state(pid):
    try:
        with open("/proc/%d/stat" % pid) as f:
            return f.read().rsplit(")", 1)[1].split()[0]
    except OSError:
        return None


def holds(predicate, seconds, what):
    """A negative observation: `predicate` stays true for a whole window (the
    thing must NOT happen, so there is no event to wait for)."""
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        if not predicate():
            raise AssertionError(what)
        time.sleep(0.05)


LOG_TIME = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d)\.(\d{3}) ")


def log_time(line):
    """Wall-clock seconds of one supervisor log line (text format)."""
    m = LOG_TIME.match(line)
    assert m, "not a log line: %r" % line
    return time.mktime(time.strptime(m.group(1), "%Y-%m-%d %H:%M:%S")) + int(m.group(2)) / 1000.0


def rx_log_lines(sup, *needles):
    return [line for line in sup.stderr().splitlines() if all(n in line for n in needles)]


class ReexecCase(unittest.TestCase):
    """Shared helpers; `env` selects the child watcher for the whole class."""

    env = {}

    def sup(self, config, env=None, **kw):
        return Sup(self, config, env=dict(self.env, **(env or {})), copy_script=True, **kw)

    def status(self, sup):
        """status --json, retried: a connection caught by the exec window is retried."""
        return wait_for(sup.answers, what="a status answer")

    def pids(self, sup):
        return {s["name"]: s["pid"] for s in self.status(sup)["services"]}

    def wait_reexecs(self, sup, n, version=None):
        def done():
            st = sup.answers()
            if st and st["supervisor"]["reexecs"] >= n and (version is None or
                                                            st["supervisor"]["version"] == version):
                return st
            return None
        st = wait_for(done, what="%d re-execs%s" % (n, " to %s" % version if version else ""))
        self.assertEqual(st["supervisor"]["reexecs"], n, "more re-execs than expected")
        return st

    def freeze_in_exec_window(self, sup, done):
        """SIGUSR2, then SIGSTOP the supervisor once it logged "re-executing" and
        before the new image logged "re-executed" (the `done` earlier ones
        excepted); retried with a new re-exec if the new image was too quick."""
        self.addCleanup(sup.proc.send_signal, signal.SIGCONT)     # never leave it stopped
        for attempt in range(5):
            execing = len(rx_log_lines(sup, "INFO  re-executing"))
            sup.proc.send_signal(signal.SIGUSR2)
            wait_for(lambda: len(rx_log_lines(sup, "INFO  re-executing")) > execing, interval=0.001,
                     what="the exec to begin")
            sup.proc.send_signal(signal.SIGSTOP)
            wait_for(lambda: proc_state(sup.proc.pid) == "T", what="the supervisor to stop")
            if len(rx_log_lines(sup, "re-executed: version")) == done + attempt:
                return
            sup.proc.send_signal(signal.SIGCONT)
            self.wait_reexecs(sup, done + attempt + 1)
        self.fail("never caught the supervisor inside its exec window")

    def assert_all_gone(self, sup, pids):
        """After the supervisor exited: none of its services, nor any helper, is left."""
        for name, pid in pids.items():
            self.assertFalse(pid_alive(pid), "%s (pid %d) outlived the supervisor" % (name, pid))
        mine = sup.dir.encode()
        left = [(pid, cmd) for pid, cmd in rx_children_of(1) + rx_children_of(os.getpid())
                if mine in cmd and pid != sup.proc.pid and proc_state(pid) not in ("Z", None)]
        self.assertEqual(left, [], "processes left behind")

    def reexec(self, sup):
        """The `reexec` request, in process: the answer comes from the new image."""
        replies = list(respawn.request(sup.sock, "reexec", timeout=DEADLINE * 2))
        self.assertTrue(replies, "no answer to reexec")
        return replies[0]

    def check_watcher(self, sup):
        """The class runs the watcher it claims to run."""
        want = HAS_PIDFD and self.env.get("RESPAWN_NO_PIDFD") != "1"
        self.assertEqual(self.status(sup)["supervisor"]["pidfds"], want)

    def skip_duplicate(self):
        if self.env.get("RESPAWN_NO_PIDFD") == "1" and not HAS_PIDFD:
            self.skipTest("no pidfd_open here (Python %d.%d): the default class already runs "
                          "the SIGCHLD watcher" % sys.version_info[:2])


SLEEPERS = """
[program:a]
command = sleep 1000
startsecs = 0.2
[program:b]
command = sleep 1001
startsecs = 0.2
"""


def rx_write_file(path, text):
    with open(path, "w") as f:
        f.write(text)


# numbers, with the digits and the newline in separate writes so that
# partial lines are in flight at every exec
COUNT_PY = """
import os, time
i = 0
while True:
    os.write(1, str(i).encode())
    time.sleep(0.002)
    os.write(1, b"\\n")
    i += 1
    time.sleep(0.0005)
"""

# 20 KB bursts: more than a pipe holds arrives during an exec window
FLOOD_PY = """
import os, time
i = 0
pad = b"x" * 190
while True:
    os.write(1, b"".join(b"%08d" % (i + k) + pad + b"\\n" for k in range(100)))
    i += 100
    time.sleep(0.02)
"""

# a partial line held across the exec, completed after it
PARTIAL_PY = """
import os, sys, time
os.write(1, b"head")
while not os.path.exists(sys.argv[1]):
    time.sleep(0.01)
os.write(1, b"tail\\nnext\\n")
time.sleep(1000)
"""

OUTPUT_CONFIG = """
[program:chatty]
command = {py} {dir}/count.py
startsecs = 0.2
[program:chatty_log]
command = {py} {dir}/count.py
startsecs = 0.2
stdout_logfile = {dir}/count.log
[program:flood]
command = {py} {dir}/flood.py
startsecs = 0.2
stdout_logfile = {dir}/flood.log
[program:partial]
command = {py} {dir}/partial.py {dir}/go
startsecs = 0.2
"""

WINDOW_CONFIG = """
[program:blip]
command = {py} -c "import signal,sys,time; signal.signal(signal.SIGUSR1, lambda *a: sys.exit(7)); time.sleep(1000)"
startsecs = 0.2
[program:oneshot]
command = sleep 1002
startsecs = 0.2
autorestart = false
[program:steady]
command = sleep 1003
startsecs = 0.2
"""

# stops 0.3 s after SIGTERM
SLOWSTOP_PY = """
import signal, sys, time
signal.signal(signal.SIGTERM, lambda *a: (time.sleep(0.3), sys.exit(0)))
while True:
    time.sleep(1)
"""

def catches(pid, sig):
    """pid has a handler installed for sig (SigCgt of /proc/PID/status)."""
    with open("/proc/%d/status" % pid) as f:
        caught = [line.split()[1] for line in f if line.startswith("SigCgt:")][0]
    return bool(int(caught, 16) & (1 << (sig - 1)))


SIGNAL_CONFIG = """
[program:a]
command = sleep 1000
startsecs = 0.2
[program:slowstop]
command = {py} {dir}/slowstop.py
startsecs = 0.2
stopwaitsecs = 5
"""


# ---------------------------------------------------------------------------
# 1. Replacing the file, and the on-demand triggers
# ---------------------------------------------------------------------------

class WatcherModes:
    """Tests that run under each child watcher (mixed into two classes below)."""

    def test_replace_by_rename_keeps_every_pid(self):
        self.skip_duplicate()
        sup = self.sup(SLEEPERS)
        sup.start()
        sup.wait_state("a", "RUNNING")
        sup.wait_state("b", "RUNNING")
        self.check_watcher(sup)
        before = self.pids(sup)
        base = read_text(sup.script)
        install_by_rename(sup.script, with_version(base, "9.9.9"))
        st = self.wait_reexecs(sup, 1, "9.9.9")
        self.assertEqual(st["supervisor"]["pid"], sup.proc.pid)
        self.assertEqual(self.pids(sup), before)
        self.assertEqual({s["state"] for s in st["services"]}, {"RUNNING"})
        self.assertTrue(all(pid_alive(p) for p in before.values()))
        line = rx_log_lines(sup, "re-executed: version")[-1]
        self.assertIn("-> 9.9.9", line)
        self.assertRegex(line, r"handoff took [\d.]+ ms")
        wait_for(lambda: not zombies_of(sup.proc.pid), what="no zombie left")
        self.assertEqual(sup.terminate(), 0)

    def test_service_exiting_in_the_exec_window_is_handled_by_the_new_image(self):
        self.skip_duplicate()
        sup = self.sup(WINDOW_CONFIG)
        sup.start()
        for name in ("blip", "oneshot", "steady"):
            sup.wait_state(name, "RUNNING")
        before = self.pids(sup)
        # RUNNING at startsecs can come before a loaded machine's Python installed it
        wait_for(lambda: catches(before["blip"], signal.SIGUSR1), what="blip's USR1 handler")
        # (1) killed right after USR2, while the trial check runs
        sup.proc.send_signal(signal.SIGUSR2)
        os.kill(before["blip"], signal.SIGUSR1)          # blip exits 7
        self.wait_reexecs(sup, 1)
        sup.wait_pid_change("blip", before["blip"])
        sup.wait_state("blip", "RUNNING")
        self.assertEqual(len(rx_log_lines(sup, "blip: exit 7 after")), 1)
        # (2) killed inside the exec window: the supervisor is frozen between its
        # "re-executing" line and the new image's "re-executed" line
        pids = self.pids(sup)
        wait_for(lambda: catches(pids["blip"], signal.SIGUSR1), what="the new blip's USR1 handler")
        self.freeze_in_exec_window(sup, 1)
        try:
            os.kill(pids["blip"], signal.SIGUSR1)
            os.kill(pids["oneshot"], signal.SIGKILL)
            wait_for(lambda: proc_state(pids["oneshot"]) in ("Z", None), what="oneshot to die")
            wait_for(lambda: proc_state(pids["blip"]) in ("Z", None), what="blip to exit")
        finally:
            sup.proc.send_signal(signal.SIGCONT)
        self.wait_reexecs(sup, 2)
        st = sup.wait_state("oneshot", "EXITED")
        self.assertEqual(st["exitstatus"], -9)
        self.assertIsNone(st["pid"])
        sup.wait_pid_change("blip", pids["blip"])
        sup.wait_state("blip", "RUNNING")
        self.assertEqual(len(rx_log_lines(sup, "blip: exit 7 after")), 2, sup.stderr())
        self.assertEqual(len(rx_log_lines(sup, "oneshot: exited (killed by SIGKILL)")), 1, sup.stderr())
        self.assertEqual(sup.svc("blip")["restarts"], 2)
        self.assertEqual(sup.svc("steady")["pid"], before["steady"])
        wait_for(lambda: not zombies_of(sup.proc.pid), what="no zombie left")
        self.assertEqual(sup.terminate(), 0)


    # -- 6. signals in the window ---------------------------------------------

    def test_term_right_after_usr2_stops_everything(self):
        self.skip_duplicate()
        sup = self.sup(SIGNAL_CONFIG)
        rx_write_file(sup.path("slowstop.py"), SLOWSTOP_PY)
        sup.start()
        sup.wait_state("a", "RUNNING")
        sup.wait_state("slowstop", "RUNNING")
        pids = self.pids(sup)
        # RUNNING at startsecs can come before a loaded machine's Python installed it
        wait_for(lambda: catches(pids["slowstop"], signal.SIGTERM), what="slowstop's TERM handler")
        sup.proc.send_signal(signal.SIGUSR2)
        sup.proc.send_signal(signal.SIGTERM)
        self.assertEqual(sup.proc.wait(DEADLINE), 0, sup.stderr())
        self.assert_all_gone(sup, pids)
        self.assertIn("slowstop: stopped (exit 0)", sup.stderr())

    def test_term_inside_the_exec_window_stops_everything(self):
        self.skip_duplicate()
        sup = self.sup(SIGNAL_CONFIG)
        rx_write_file(sup.path("slowstop.py"), SLOWSTOP_PY)
        sup.start()
        sup.wait_state("a", "RUNNING")
        sup.wait_state("slowstop", "RUNNING")
        pids = self.pids(sup)
        # RUNNING at startsecs can come before a loaded machine's Python installed it
        wait_for(lambda: catches(pids["slowstop"], signal.SIGTERM), what="slowstop's TERM handler")
        self.freeze_in_exec_window(sup, 0)
        sup.proc.send_signal(signal.SIGTERM)
        sup.proc.send_signal(signal.SIGCONT)
        self.assertEqual(sup.proc.wait(DEADLINE), 0, sup.stderr())
        self.assert_all_gone(sup, pids)
        log = sup.stderr()
        self.assertLess(log.index("re-executed: version"), log.index("got SIGTERM"))

    def test_term_pending_when_the_exec_is_due_wins(self):
        """TERM arrives together with the end of the trial: no exec, a clean stop."""
        self.skip_duplicate()
        sup = self.sup(SIGNAL_CONFIG)
        rx_write_file(sup.path("slowstop.py"), SLOWSTOP_PY)
        sup.start()
        sup.wait_state("a", "RUNNING")
        sup.wait_state("slowstop", "RUNNING")
        pids = self.pids(sup)
        # RUNNING at startsecs can come before a loaded machine's Python installed it
        wait_for(lambda: catches(pids["slowstop"], signal.SIGTERM), what="slowstop's TERM handler")
        # a new file whose trial takes a while, so that the supervisor can be
        # frozen while it runs and the trial's exit and TERM wait together
        install_by_rename(sup.script, with_version(slow_trial(read_text(sup.script)), "9.9.9"))
        trial = wait_for(lambda: [p for p, cmd in rx_children_of(sup.proc.pid) if b"--handoff-selftest" in cmd],
                         what="the trial check", interval=0.005)[0]
        sup.proc.send_signal(signal.SIGSTOP)
        wait_for(lambda: proc_state(trial) == "Z", what="the trial to finish")
        sup.proc.send_signal(signal.SIGTERM)
        sup.proc.send_signal(signal.SIGCONT)
        self.assertEqual(sup.proc.wait(DEADLINE), 0, sup.stderr())
        self.assert_all_gone(sup, pids)
        self.assertNotIn("INFO  re-executing", sup.stderr())


class TestReexecOneWatcher(ReexecCase):
    """What does not depend on how exits are collected: run once."""

    def test_output_no_line_lost_or_doubled_across_reexecs(self):
        sup = self.sup(OUTPUT_CONFIG)
        rx_write_file(sup.path("count.py"), COUNT_PY)
        rx_write_file(sup.path("flood.py"), FLOOD_PY)
        rx_write_file(sup.path("partial.py"), PARTIAL_PY)
        sup.start()
        for name in ("chatty", "chatty_log", "flood", "partial"):
            sup.wait_state(name, "RUNNING")
        before = self.pids(sup)
        sup.wait_log("chatty | 20", stream="stdout")
        for n in range(1, 4):
            reply = self.reexec(sup)
            self.assertTrue(reply.get("ok"), reply)
            self.wait_reexecs(sup, n)
            seen = len(sup.stdout().splitlines())
            # output flows again through the new image before the next exec
            wait_for(lambda: len(sup.stdout().splitlines()) > seen + 20, what="output after re-exec %d" % n)
        # the partial line "head" was held by the old image at the exec
        rx_write_file(sup.path("go"), "")
        sup.wait_log("partial | headtail", stream="stdout")
        self.assertEqual(self.pids(sup), before)
        self.assertEqual(sup.terminate(), 0)
        out = sup.stdout().splitlines()
        chatty = [l[len("chatty | "):] for l in out if l.startswith("chatty | ")]
        self.assert_counts(chatty, "stdout")
        self.assert_counts(read_text(sup.path("count.log")).splitlines(), "count.log")
        flood = read_text(sup.path("flood.log")).splitlines()
        self.assertGreater(len(flood), 2000)
        self.assertEqual([l[:8] for l in flood], ["%08d" % i for i in range(len(flood))],
                         "flood.log lost, doubled or split lines")
        self.assertEqual({len(l) for l in flood[:-1]}, {198})
        self.assertFalse([l for l in out if l.startswith("chatty_log |") or l.startswith("flood |")])
        partial = [l for l in out if l.startswith("partial | ")]
        self.assertEqual(partial, ["partial | headtail", "partial | next"])

    def assert_counts(self, lines, where):
        numbers = [int(l) for l in lines]
        self.assertGreater(len(numbers), 100, where)
        if numbers != list(range(len(numbers))):
            gaps = [(a, b) for a, b in zip(numbers, numbers[1:]) if b != a + 1]
            self.fail("%s: lines lost or doubled around %s" % (where, gaps[:5]))

    def test_hup_inside_the_exec_window_is_applied_by_the_new_image(self):
        sup = self.sup(SLEEPERS)
        sup.start()
        sup.wait_state("a", "RUNNING")
        sup.wait_state("b", "RUNNING")
        pids = self.pids(sup)
        sup.write_config(SLEEPERS + "[program:c]\ncommand = sleep 1004\nstartsecs = 0.2\n")
        self.freeze_in_exec_window(sup, 0)
        sup.proc.send_signal(signal.SIGHUP)
        sup.proc.send_signal(signal.SIGCONT)
        sup.wait_state("c", "RUNNING")
        log = sup.stderr()
        self.assertLess(log.index("re-executed: version"), log.index("reloaded "))
        self.assertEqual(self.status(sup)["supervisor"]["reexecs"], 1)
        self.assertEqual({k: v for k, v in self.pids(sup).items() if k != "c"}, pids)

    def test_hup_right_after_usr2_is_not_lost(self):
        sup = self.sup(SLEEPERS)
        sup.start()
        sup.wait_state("a", "RUNNING")
        sup.wait_state("b", "RUNNING")
        pids = self.pids(sup)
        sup.write_config(SLEEPERS + "[program:c]\ncommand = sleep 1004\nstartsecs = 0.2\n")
        sup.proc.send_signal(signal.SIGUSR2)
        sup.proc.send_signal(signal.SIGHUP)
        self.wait_reexecs(sup, 1)
        sup.wait_state("c", "RUNNING")
        self.assertEqual(len(rx_log_lines(sup, "reloaded ")), 1)
        self.assertEqual({k: v for k, v in self.pids(sup).items() if k != "c"}, pids)

    def test_a_request_on_a_connection_open_across_the_exec_is_answered(self):
        sup = self.sup(SLEEPERS)
        sup.start()
        sup.wait_state("a", "RUNNING")
        conn = socket.socket(socket.AF_UNIX)
        self.addCleanup(conn.close)
        conn.connect(sup.sock)
        # accepted by the old image (it answers the first status after it)
        self.status(sup)
        self.freeze_in_exec_window(sup, 0)
        conn.sendall(b'{"v": 1, "cmd": "status"}\n')
        sup.proc.send_signal(signal.SIGCONT)
        conn.settimeout(DEADLINE)
        data = b""
        while b"\n" not in data:
            chunk = conn.recv(65536)
            if not chunk:
                break
            data += chunk
        self.assertIn(b"\n", data, "the connection was closed without an answer")
        reply = json.loads(data.split(b"\n")[0])
        self.assertEqual(reply["supervisor"]["reexecs"], 1)

    def test_a_start_waiting_across_the_exec_is_answered_by_the_new_image(self):
        sup = self.sup("[program:slow]\ncommand = sleep 1000\nautostart = false\nstartsecs = 3\n"
                       + SLEEPERS)
        sup.start()
        sup.wait_state("a", "RUNNING")
        start = subprocess.Popen([PY, sup.script, "-c", sup.config, "start", "slow"],
                                 stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=sup.env)
        self.addCleanup(lambda: start.poll() is None and start.kill())
        sup.wait_state("slow", "STARTING")
        pid = sup.svc("slow")["pid"]
        sup.proc.send_signal(signal.SIGUSR2)
        st = self.wait_reexecs(sup, 1)
        self.assertEqual([s["state"] for s in st["services"] if s["name"] == "slow"], ["STARTING"],
                         "slow was RUNNING before the exec: the test proves nothing")
        out, _ = start.communicate(timeout=DEADLINE)
        self.assertEqual((start.returncode, out), (0, "slow: RUNNING\n"))
        self.assertEqual(sup.svc("slow")["pid"], pid)
        self.assertEqual(sup.terminate(), 0)

    def test_a_stop_begun_during_the_trial_finishes_before_the_exec(self):
        sup = self.sup("[program:slow]\ncommand = {py} {dir}/ignore_term.py {dir}/slow.ready\n"
                       "startsecs = 0.2\nstopwaitsecs = 300\n" + SLEEPERS)
        rx_write_file(sup.path("ignore_term.py"), IGNORE_TERM_PY)
        sup.start()
        wait_for(lambda: os.path.exists(sup.path("slow.ready")), what="slow to ignore SIGTERM")
        before = self.pids(sup)
        install_by_rename(sup.script, with_version(slow_trial(read_text(sup.script), 0.5), "9.9.9"))
        wait_for(lambda: rx_log_lines(sup, "file changed: checking the new code"), interval=0.005,
                 what="the trial to begin")
        stop = socket.socket(socket.AF_UNIX)
        self.addCleanup(stop.close)
        stop.connect(sup.sock)
        stop.sendall(b'{"v": 1, "cmd": "stop", "args": {"names": ["slow"]}}\n')
        stop.settimeout(DEADLINE)
        # the stop outlasts the trial however slow the machine: slow ignores SIGTERM and
        # stopwaitsecs is long, so it ends only when the test kills it, once postponed
        sup.wait_log("re-exec postponed until the stop in progress is done")
        self.assertEqual(self.status(sup)["supervisor"]["reexecs"], 0)
        os.kill(before["slow"], signal.SIGKILL)
        reply = json.loads(stop.makefile("rb").readline())
        self.assertEqual(reply["results"]["slow"]["state"], "STOPPED")
        self.wait_reexecs(sup, 1, "9.9.9")
        log = sup.stderr()
        self.assertIn("re-exec postponed until the stop in progress is done", log)
        self.assertLess(log.index("slow: stopped (killed by SIGKILL)"), log.index("INFO  re-executing"))
        self.assertEqual({k: v for k, v in self.pids(sup).items() if k != "slow"},
                         {k: v for k, v in before.items() if k != "slow"})

    def test_term_during_a_trial_leaves_no_trial_behind(self):
        sup = self.sup(SLEEPERS)
        sup.start()
        sup.wait_state("a", "RUNNING")
        pids = self.pids(sup)
        install_by_rename(sup.script, with_version(slow_trial(read_text(sup.script)), "9.9.9"))
        wait_for(lambda: [p for p, cmd in rx_children_of(sup.proc.pid) if b"--handoff-selftest" in cmd],
                 what="the trial check", interval=0.005)
        sup.proc.send_signal(signal.SIGTERM)
        self.assertEqual(sup.proc.wait(DEADLINE), 0, sup.stderr())
        self.assert_all_gone(sup, pids)
        self.assertNotIn("INFO  re-executing", sup.stderr())


class TestReexecPidfd(WatcherModes, ReexecCase):
    env = {}


class TestReexecSigchld(WatcherModes, ReexecCase):
    env = {"RESPAWN_NO_PIDFD": "1"}


class TestReexecTriggers(ReexecCase):
    def test_touch_and_same_content_do_not_reexec_and_in_place_write_does(self):
        sup = self.sup(SLEEPERS)
        sup.start()
        sup.wait_state("a", "RUNNING")
        before = self.pids(sup)
        self.assertTrue([t for t in fd_targets(sup.proc.pid) if "inotify" in t],
                        "no inotify fd: the default watcher polls")
        base = read_text(sup.script)
        os.utime(sup.script)                          # touch
        install_by_rename(sup.script, base)           # same bytes, new inode
        # inotify debounces 0.3 s: well past it, still nothing was checked or exec'd
        holds(lambda: self.status(sup)["supervisor"]["reexecs"] == 0
              and "checking the new code" not in sup.stderr(), 1.0,
              "touch or a same-content rename re-executed the supervisor")
        install_in_place(sup.script, with_version(base, "9.9.9"))
        st = self.wait_reexecs(sup, 1, "9.9.9")
        self.assertEqual(st["supervisor"]["pid"], sup.proc.pid)
        self.assertEqual(self.pids(sup), before)

    def test_stat_fallback_sees_an_in_place_write(self):
        sup = self.sup(SLEEPERS, env={"RESPAWN_NO_INOTIFY": "1"})
        sup.start()
        sup.wait_state("a", "RUNNING")
        before = self.pids(sup)
        fds = fd_targets(sup.proc.pid)
        self.assertFalse([t for t in fds if "inotify" in t], "RESPAWN_NO_INOTIFY=1 still uses inotify")
        install_in_place(sup.script, with_version(read_text(sup.script), "9.9.9"))
        st = self.wait_reexecs(sup, 1, "9.9.9")
        self.assertEqual(st["supervisor"]["pid"], sup.proc.pid)
        self.assertEqual(self.pids(sup), before)
        self.assertFalse([t for t in fd_targets(sup.proc.pid) if "inotify" in t], "the new image uses inotify")

    def test_reexec_command_and_sigusr2(self):
        # watch_self would react to the write: the command must do it by itself
        sup = self.sup("[respawn]\nwatch_self = false\n" + SLEEPERS)
        sup.start()
        sup.wait_state("a", "RUNNING")
        sup.wait_state("b", "RUNNING")
        before = self.pids(sup)
        base = read_text(sup.script)
        install_by_rename(sup.script, with_version(base, "9.9.8"))
        p = sup.ctl("reexec")
        self.assertEqual(p.returncode, 0, p.stdout + p.stderr)
        self.assertIn("re-executed: pid %d, version 9.9.8" % sup.proc.pid, p.stdout)
        self.wait_reexecs(sup, 1, "9.9.8")
        install_by_rename(sup.script, with_version(base, "9.9.9"))
        sup.proc.send_signal(signal.SIGUSR2)
        st = self.wait_reexecs(sup, 2, "9.9.9")
        self.assertEqual(st["supervisor"]["pid"], sup.proc.pid)
        self.assertEqual(self.pids(sup), before)
        self.assertEqual(len(rx_log_lines(sup, "SIGUSR2: checking the new code")), 1)


# ---------------------------------------------------------------------------
# 4. A bad new file is refused (or rolled back); 5. unsafe files as root
# ---------------------------------------------------------------------------

class TestReexecRefusals(ReexecCase):
    def assert_still_supervising(self, sup, before, version=respawn.__version__, reexecs=0):
        st = self.status(sup)
        self.assertEqual(st["supervisor"]["pid"], sup.proc.pid)
        self.assertEqual(st["supervisor"]["version"], version)
        self.assertEqual(st["supervisor"]["reexecs"], reexecs)
        self.assertEqual(self.pids(sup), before)
        # and it still respawns a killed service
        os.kill(before["b"], signal.SIGKILL)
        new = sup.wait_pid_change("b", before["b"])
        before["b"] = new["pid"]

    def test_broken_new_files_are_refused_once_and_supervision_goes_on(self):
        sup = self.sup(SLEEPERS)
        sup.start()
        sup.wait_state("a", "RUNNING")
        sup.wait_state("b", "RUNNING")
        before = self.pids(sup)
        base = read_text(sup.script)
        version = self.status(sup)["supervisor"]["version"]
        cases = [
            ("syntax", base + "\ndef broken(:\n", "new code does not compile: invalid syntax"),
            ("import", after_version(base, 'raise RuntimeError("broken at import")\n'),
             "RuntimeError: broken at import"),
            ("check", patched(base, '"startsecs": (parse_duration', '"startseconds": (parse_duration'),
             "unknown key 'startsecs'"),
        ]
        for n, (what, text, why) in enumerate(cases, 1):
            install_by_rename(sup.script, with_version(text, "6.6.%d" % n))
            sup.wait_log(why)
            refused = rx_log_lines(sup, "re-exec refused")
            self.assertEqual(len(refused), n, "\n".join(refused))
            self.assertIn(why, refused[-1])
            self.assertIn("the running code keeps supervising", refused[-1])
            self.assert_still_supervising(sup, before, version)
        # not retried: neither by itself nor when the bad file is only touched
        os.utime(sup.script)
        checks = len(rx_log_lines(sup, "checking the new code"))
        self.assertEqual(checks, 2, "the syntax error must be caught before a trial")
        holds(lambda: len(rx_log_lines(sup, "re-exec refused")) == 3
              and len(rx_log_lines(sup, "checking the new code")) == checks, 1.0,
              "a rejected file was tried again")
        # a good file afterwards goes through
        install_by_rename(sup.script, with_version(base, "9.9.9"))
        self.wait_reexecs(sup, 1, "9.9.9")
        self.assertEqual(self.pids(sup), before)
        self.assertEqual(sup.terminate(), 0)

    def test_reexec_command_reports_a_refusal(self):
        sup = self.sup(SLEEPERS.replace("[program:a]", "[respawn]\nwatch_self = false\n\n[program:a]"))
        sup.start()
        sup.wait_state("a", "RUNNING")
        install_by_rename(sup.script, read_text(sup.script) + "\ndef broken(:\n")
        p = ctl_with(SCRIPT, sup, "reexec")      # the client from a good copy
        self.assertEqual(p.returncode, 1, p.stderr)
        self.assertIn("new code does not compile", p.stderr)
        self.assertEqual(self.status(sup)["supervisor"]["reexecs"], 0)

    def test_new_code_failing_in_restore_is_rolled_back(self):
        sup = self.sup(SLEEPERS)
        sup.start()
        sup.wait_state("a", "RUNNING")
        sup.wait_state("b", "RUNNING")
        before = self.pids(sup)
        base = read_text(sup.script)
        version = self.status(sup)["supervisor"]["version"]
        bad = patched(base, "    def restore(self, state):\n",
                      "    def restore(self, state):\n        raise RuntimeError('broken restore')\n")
        install_by_rename(sup.script, with_version(bad, "6.6.6"))
        sup.wait_log("the new code failed to restore")
        self.assertEqual(len(rx_log_lines(sup, "restore failed (RuntimeError: broken restore); rolling back")), 1)
        st = self.status(sup)
        self.assertEqual(st["supervisor"]["version"], version)
        # the rolled-back image still shows as respawn.py in ps / pgrep -f
        self.assertIn(sup.script.encode(), cmdline(sup.proc.pid))
        self.assert_still_supervising(sup, before, version, reexecs=st["supervisor"]["reexecs"])
        holds(lambda: len(rx_log_lines(sup, "rolling back")) == 1, 1.0, "the bad file was retried")
        # from the rolled-back image, a good file still goes through
        install_by_rename(sup.script, with_version(base, "9.9.9"))
        self.wait_reexecs(sup, st["supervisor"]["reexecs"] + 1, "9.9.9")
        self.assertEqual(self.pids(sup), before)
        self.assertNotIn(b"/proc/self/fd", b" ".join(cmdline(sup.proc.pid)))
        self.assertEqual(sup.terminate(), 0)


class TestReexecQuietWatch(ReexecCase):
    """Watching respawn.py costs nothing when other files in its folder change
    (a log written beside the script must not wake the supervisor)."""

    def test_writes_beside_the_script_do_not_wake_the_supervisor(self):
        sup = self.sup("""
            [program:steady]
            command = sleep 1000
            startsecs = 0
            """).start()
        sup.wait_state("steady", "RUNNING")
        self.assertNotIn("RESPAWN_NO_INOTIFY", sup.env)     # the inotify watcher

        def switches():
            sup.status()        # a round trip: whatever woke it before is counted after
            with open("/proc/%d/status" % sup.proc.pid) as f:
                return int([line.split()[1] for line in f
                            if line.startswith("voluntary_ctxt_switches")][0])
        idle = switches()
        idle = switches() - idle                  # what one status round trip costs
        before = switches()
        sibling = sup.path("app.log")
        for i in range(40):
            with open(sibling, "a") as f:
                f.write("line %d\n" % i)
        spent = switches() - before
        self.assertLess(spent, idle + 10, "40 writes beside the script woke the supervisor")
        # the watch itself still works: an in-place change of the script re-execs
        with open(sup.script, "a") as f:
            f.write("\n# changed\n")
        self.wait_reexecs(sup, 1)


class TestReexecExecFails(ReexecCase):
    """If os.execv itself fails, the old code keeps supervising (issue 3)."""

    def test_execv_failure_leaves_the_old_image_running(self):
        # The supervisor runs through a symlinked interpreter (sys.executable is the
        # link).  The link is removed once the trial check has passed, so the exec
        # that follows fails with ENOENT.
        bindir = tempfile.mkdtemp(prefix="respawn-py-")
        self.addCleanup(shutil.rmtree, bindir, True)
        link = os.path.join(bindir, "python3")
        os.symlink(os.path.realpath(PY), link)
        sup = self.sup("""
            [program:steady]
            command = sleep 1000
            startsecs = 0
            """)
        sup.out, sup.err = open(sup.out_path, "ab"), open(sup.err_path, "ab")
        sup.proc = subprocess.Popen([link, sup.script, "-c", sup.config, "run"],
                                    stdout=sup.out, stderr=sup.err, env=sup.env,
                                    start_new_session=True, cwd=sup.dir)
        before = wait_for(lambda: (lambda s: s if s["state"] == "RUNNING" else None)(
            sup.svc("steady")) if sup.answers() else None, what="steady RUNNING")
        files_before = wait_for(lambda: quiet_fds(sup.proc.pid), what="no control connection open")

        def trial():
            for pid, cmd in rx_children_of(sup.proc.pid):
                if b"--handoff-selftest" in cmd:
                    return pid
            return None
        os.kill(sup.proc.pid, signal.SIGUSR2)
        trial_pid = wait_for(trial, what="the trial check")
        # the supervisor is frozen while the trial finishes (a zombie until reaped),
        # so the link goes away after the trial passed and before the exec
        os.kill(sup.proc.pid, signal.SIGSTOP)
        self.addCleanup(lambda: sup.proc.poll() is None and os.kill(sup.proc.pid, signal.SIGCONT))
        wait_for(lambda: not pid_alive(trial_pid), what="the trial to finish")
        os.unlink(link)
        os.kill(sup.proc.pid, signal.SIGCONT)
        sup.wait_log("exec of %s failed" % link)
        st = wait_for(sup.answers, what="the old image answering")
        self.assertEqual(st["supervisor"]["pid"], sup.proc.pid)
        self.assertEqual(st["supervisor"]["reexecs"], 0)
        self.assertEqual(sup.svc("steady")["pid"], before["pid"])
        self.assertIsNone(sup.proc.poll())
        # nothing leaked: the memfds are closed and the mask is restored.  (Both
        # lists are taken with no control connection open: a status client's
        # socket may outlive its answer for a moment on the supervisor's side.)
        wait_for(lambda: quiet_fds(sup.proc.pid) == files_before,
                 what="the open files back to %s" % files_before)
        with open("/proc/%d/status" % sup.proc.pid) as f:
            blocked = [line.split()[1] for line in f if line.startswith("SigBlk:")][0]
        self.assertEqual(int(blocked, 16), 0)
        os.kill(before["pid"], signal.SIGKILL)          # and it still supervises
        sup.wait_pid_change("steady", before["pid"])
        self.assertEqual(sup.terminate(), 0)


class TestReexecHandoffFails(ReexecCase):
    """A failure while writing the state (a bug) refuses the re-exec and leaves
    the running image as it was: signals unblocked, no fd left open."""

    def test_a_failing_handoff_keeps_the_old_image_whole(self):
        sup = self.sup(SLEEPERS)
        rx_write_file(sup.script, patched(read_text(sup.script),
                                          "        state = encode_handoff(self, pending, new_hash, client, t0)\n",
                                          "        state = encode_handoff(self, pending, new_hash, client, t0)\n"
                                          "        state['unwritable'] = object()\n"))
        sup.start()
        sup.wait_state("a", "RUNNING")
        before = self.pids(sup)
        files_before = wait_for(lambda: quiet_fds(sup.proc.pid), what="no control connection open")
        sup.proc.send_signal(signal.SIGUSR2)
        sup.wait_log("re-exec refused: the handoff failed: TypeError")
        self.assertEqual(self.status(sup)["supervisor"]["reexecs"], 0)
        self.assertEqual(self.pids(sup), before)
        wait_for(lambda: quiet_fds(sup.proc.pid) == files_before,
                 what="the open files back to %s" % files_before)
        with open("/proc/%d/status" % sup.proc.pid) as f:
            blocked = [line.split()[1] for line in f if line.startswith("SigBlk:")][0]
        self.assertEqual(int(blocked, 16), 0)
        self.assertEqual(sup.terminate(), 0)        # TERM still reaches it
        self.assert_all_gone(sup, before)


class TestReexecTrialFilesFail(ReexecCase):
    def test_an_unwritable_temporary_folder_refuses_once_and_the_next_try_works(self):
        tmp = tempfile.mkdtemp(prefix="respawn-tmpdir-")
        self.addCleanup(shutil.rmtree, tmp, True)
        sup = self.sup(SLEEPERS, env={"TMPDIR": tmp})
        sup.start()
        sup.wait_state("a", "RUNNING")
        before = self.pids(sup)
        # a new file its trial rejects: the running image has chosen its temporary
        # folder (tempfile caches it), and stays
        base = read_text(sup.script)
        install_by_rename(sup.script, after_version(base, 'import sys as _s\n'
                                                          'if "--handoff-selftest" in _s.argv: _s.exit(1)\n'))
        sup.wait_log("re-exec refused: the new code rejects")
        install_by_rename(sup.script, base)
        os.rmdir(tmp)
        reply = self.reexec(sup)
        self.assertFalse(reply["ok"])
        self.assertIn("cannot write the trial's files in %s" % tmp, reply["error"])
        sup.wait_log("re-exec refused: cannot write the trial's files")
        os.mkdir(tmp)
        self.assertEqual(self.reexec(sup)["ok"], True)      # not stuck "in progress"
        self.wait_reexecs(sup, 1)
        self.assertEqual(self.pids(sup), before)
        self.assertEqual(sup.terminate(), 0)


class TestReexecTrial(ReexecCase):
    """The trial runs what the exec will run (issue 15): the code the supervisor
    has compiled, through the loader, reading the config from the sections the
    state carries; neither the file nor the config's text is parsed again."""

    def test_the_trial_runs_the_compiled_code_on_the_carried_sections(self):
        sup = self.sup(SLEEPERS.replace("[program:a]", "[respawn]\nwatch_self = false\n\n[program:a]"))
        sup.start()
        sup.wait_state("a", "RUNNING")
        before = self.pids(sup)
        trial, parsed = os.path.join(sup.dir, "trial.txt"), os.path.join(sup.dir, "parsed.txt")
        new = patched(read_text(sup.script), "def _parse_ini(text, supervisord):\n",
                      "def _parse_ini(text, supervisord):\n"
                      "    open(%r, 'a').write('%%s\\n' %% sys.argv[1:])\n" % parsed)
        new = patched(new, "    if args.handoff_selftest:\n",
                      "    if args.handoff_selftest:\n"
                      "        open(%r, 'w').write(repr((loaded, sys.flags.no_site)))\n"
                      % trial)
        install_by_rename(sup.script, with_version(new, "7.7.7"))
        reply = self.reexec(sup)
        self.assertTrue(reply["ok"], reply)
        self.assertEqual(read_text(trial), "(True, 1)")       # the loader's code, as the exec (-S)
        self.wait_reexecs(sup, 1, "7.7.7")
        self.assertFalse(os.path.exists(parsed), "the INI text was parsed: %s"
                         % (read_text(parsed) if os.path.exists(parsed) else ""))
        self.assertEqual(self.pids(sup), before)
        # (a reload reads the file on disk: it parses, as always)
        self.assertEqual(sup.ctl("reload").returncode, 0)
        self.assertTrue(os.path.exists(parsed))
        self.assertEqual(sup.terminate(), 0)


@unittest.skipUnless(os.geteuid() == 0, "the writable-file refusal applies only when running as root")
class TestReexecAsRoot(ReexecCase):
    def test_group_writable_file_and_world_writable_folder_are_refused(self):
        sup = self.sup(SLEEPERS)
        sup.start()
        sup.wait_state("a", "RUNNING")
        before = self.pids(sup)
        base = read_text(sup.script)
        # a chmod alone changes no code: nothing to check, nothing to refuse
        os.chmod(sup.script, 0o664)
        holds(lambda: not rx_log_lines(sup, "re-exec refused"), 0.8, "a chmod alone was taken as new code")
        # a group-writable file: refused, and nothing exec'd
        install_in_place(sup.script, with_version(base, "9.9.8"))
        sup.wait_log("refusing to re-execute as root")
        line = rx_log_lines(sup, "re-exec refused")[-1]
        self.assertIn("%s is writable by group (mode 664)" % sup.script, line)
        self.assertEqual(self.status(sup)["supervisor"]["reexecs"], 0)
        self.assertEqual(self.status(sup)["supervisor"]["version"], respawn.__version__)
        self.assertEqual(rx_log_lines(sup, "checking the new code"), [])
        sup.proc.send_signal(signal.SIGUSR2)
        wait_for(lambda: len(rx_log_lines(sup, "refusing to re-execute as root")) == 2, what="USR2 refused")
        # made safe, the same file is taken
        os.chmod(sup.script, 0o644)
        self.wait_reexecs(sup, 1, "9.9.8")
        # a folder anyone can write to, not sticky: refused
        os.chmod(sup.dir, 0o777)
        self.addCleanup(os.chmod, sup.dir, 0o700)
        install_by_rename(sup.script, with_version(base, "9.9.9"))
        wait_for(lambda: len(rx_log_lines(sup, "refusing to re-execute as root")) == 3, what="folder refused")
        self.assertRegex(rx_log_lines(sup, "refusing to re-execute as root")[-1],
                         re.escape(sup.dir) + r" is writable by (group|others) \(mode 777\)")
        p = sup.ctl("reexec")
        self.assertEqual(p.returncode, 1)
        self.assertIn("%s is writable by" % sup.dir, p.stderr)
        st = self.status(sup)
        self.assertEqual((st["supervisor"]["reexecs"], st["supervisor"]["version"]), (1, "9.9.8"))
        os.chmod(sup.dir, 0o700)
        self.assertTrue(self.reexec(sup)["ok"])     # the folder's mode is not watched: ask
        self.wait_reexecs(sup, 2, "9.9.9")
        self.assertEqual(self.pids(sup), before)
        self.assertEqual(sup.terminate(), 0)


# ---------------------------------------------------------------------------
# 7. Hygiene after many re-execs; 8. timers across a re-exec
# ---------------------------------------------------------------------------

class TestReexecHygiene(ReexecCase):
    def test_ten_reexecs_keep_fds_argv_and_signal_masks_clean(self):
        sup = self.sup(SLEEPERS + "[program:c]\ncommand = sleep 1005\nstartsecs = 0.2\n"
                       "stdout_logfile = {dir}/c.log\nstderr_logfile = {dir}/c.err\n")
        sup.start()
        for name in ("a", "b", "c"):
            sup.wait_state(name, "RUNNING")
        before = self.pids(sup)
        self.assertTrue(self.reexec(sup)["ok"])          # strays from our launcher go here
        # the listening socket only (a client's connection may still be closing)
        # and none of the files it reads for a moment (boot_id, /proc/PID/stat, the state
        # file) caught open: the snapshot is of the supervisor at rest
        at_rest = lambda: (lambda m: list(m.values()).count("socket:") == 1
                           and not [t for t in m.values() if t.startswith("/proc/") or "respawn-state" in t])(
            fd_map(sup.proc.pid))
        wait_for(at_rest, what="clients closed")
        fds, argv = fd_map(sup.proc.pid), cmdline(sup.proc.pid)
        watching = sum(map(len, epoll_watch(sup.proc.pid).values()))
        for n in range(10):
            reply = self.reexec(sup)
            self.assertTrue(reply["ok"], reply)
        st = self.wait_reexecs(sup, 11)
        self.assertEqual(st["supervisor"]["pid"], sup.proc.pid)
        self.assertEqual(self.pids(sup), before)
        # (the connection of our last status request may still be closing)
        try:
            wait_for(lambda: len(fd_map(sup.proc.pid)) == len(fds), timeout=5, what="the fd count")
        except AssertionError:
            self.fail("the supervisor's fds changed:\n%s\n%s" % (fds, fd_map(sup.proc.pid)))
        self.assertFalse([t for t in fd_targets(sup.proc.pid) if "memfd:" in t or "respawn-state" in t],
                         "a handoff memfd was left open")
        self.assertEqual(cmdline(sup.proc.pid), argv, "argv changed")
        self.assertEqual(argv.count(b"--handoff"), 1)
        self.assertEqual(argv.count(sup.script.encode()), 1)
        self.assertEqual(rx_proc_status(sup.proc.pid, "SigBlk"), "0" * 16)
        # one epoll instance, handed from image to image: it watches open fds of
        # ours only (none left behind by an image), and no fd is passed on by an exec
        wait_for(lambda: (lambda w: len(w) == 1 and set(w[min(w)]) <= set(fd_map(sup.proc.pid))
                          and len(w[min(w)]) == watching)(epoll_watch(sup.proc.pid)),
                 timeout=5, what="one epoll instance watching as many open fds as before")
        wait_for(lambda: not not_cloexec(sup.proc.pid), timeout=5, what="every fd close-on-exec again")
        wait_for(lambda: not zombies_of(sup.proc.pid), what="no zombie left")
        for name, pid in before.items():
            self.assertEqual(fds_but_held(pid), [0, 1, 2], "%s holds more than stdio" % name)
        # a service started by the re-exec'd image starts clean
        os.kill(before["a"], signal.SIGKILL)
        new = sup.wait_pid_change("a", before["a"])["pid"]
        self.assertEqual(rx_proc_status(new, "SigBlk"), "0" * 16)
        self.assertEqual(rx_proc_status(new, "SigIgn"), "0" * 16)
        # (the dynamic loader of a just-exec'd program holds fd 3 for a moment)
        wait_for(lambda: fds_but_held(new) == [0, 1, 2], timeout=5, what="only stdio in the new service")
        self.assertEqual(sup.terminate(), 0)


# ignores SIGTERM, and says so with a file once it does
IGNORE_TERM_PY = """
import signal, sys, time
signal.signal(signal.SIGTERM, signal.SIG_IGN)
open(sys.argv[1], "w").close()
time.sleep(1000)
"""

TIMERS_CONFIG = """
[program:failing]
command = sh -c "exit 3"
startsecs = 0.5
backoff = 8
backoff_max = 8
startretries = 5
[program:stubborn]
command = {py} {dir}/ignore_term.py {dir}/stubborn.ready
startsecs = 0.2
stopwaitsecs = 3
[program:removed]
command = {py} {dir}/ignore_term.py {dir}/removed.ready
startsecs = 0.2
stopwaitsecs = 3
[program:slowstart]
command = sleep 1006
startsecs = 8
"""


class TestReexecTimers(ReexecCase):
    def span(self, sup, first, then):
        """Seconds between the first log line holding `first` and the next one holding
        `then`, and whether a re-exec happened in between."""
        lines = sup.stderr().splitlines()
        i = next(n for n, l in enumerate(lines) if first in l)
        j = next(n for n in range(i + 1, len(lines)) if then in lines[n])
        crossed = any("re-executed: version" in l for l in lines[i:j])
        return log_time(lines[j]) - log_time(lines[i]), crossed

    def test_backoff_stop_and_start_timers_survive_a_reexec(self):
        sup = self.sup(TIMERS_CONFIG)
        rx_write_file(sup.path("ignore_term.py"), IGNORE_TERM_PY)
        sup.start()
        sup.wait_state("stubborn", "RUNNING")
        sup.wait_state("removed", "RUNNING")
        wait_for(lambda: os.path.exists(sup.path("stubborn.ready")) and os.path.exists(sup.path("removed.ready")),
                 what="the services to ignore SIGTERM")
        sup.wait_state("failing", "BACKOFF")
        pids = self.pids(sup)
        # (the durations leave room for a slow trial and exec on a loaded machine: the
        # re-exec must land inside failing's backoff and slowstart's startsecs, both
        # counted from the supervisor's start, and under CI's load that took over 3.5 s)
        # a new file whose trial takes 0.5 s: the stops below begin in the old image
        # and their SIGKILL falls due in the new one
        install_by_rename(sup.script, with_version(slow_trial(read_text(sup.script), 0.5), "9.9.9"))
        wait_for(lambda: rx_log_lines(sup, "file changed: checking the new code"), interval=0.005,
                 what="the trial to begin")
        # stubborn: its command changed (stop, then start anew); removed: dropped
        sup.write_config(TIMERS_CONFIG.split("[program:removed]")[0].replace("stubborn.ready", "stubborn2.ready")
                         + "[program:slowstart]" + TIMERS_CONFIG.split("[program:slowstart]")[1])
        sup.proc.send_signal(signal.SIGHUP)
        self.wait_reexecs(sup, 1, "9.9.9")
        log = sup.stderr()
        for name in ("stubborn", "removed"):
            self.assertLess(log.index("%s: stopping (" % name), log.index("INFO  re-executing"),
                            "%s's stop began after the exec: the machine is too slow" % name)
        # SIGKILL at stopwaitsecs, counted from the stop, by the new image
        sup.wait_log("stubborn: stopped (killed by SIGKILL)")
        sup.wait_log("removed: stopped (killed by SIGKILL)")
        for name in ("stubborn", "removed"):
            took, crossed = self.span(sup, "%s: stopping (" % name, "%s: still alive after 3s: SIGKILL" % name)
            self.assertTrue(crossed, "the re-exec came after %s's SIGKILL: the machine is too slow" % name)
            self.assertGreaterEqual(took, 2.99)
            self.assertLess(took, 3.6, "SIGKILL late: the new image did not keep the deadline")
            wait_for(lambda: not pid_alive(pids[name]), what="%s to be gone" % name)
        # stubborn then starts with its new command
        new = sup.wait_pid_change("stubborn", pids["stubborn"])["pid"]
        self.assertIn(b"stubborn2.ready", b" ".join(cmdline(new)))
        wait_for(lambda: "removed" not in self.pids(sup), what="removed to leave the status")
        # the backoff delay, from the old image's decision to the new image's start
        sup.wait_log("failing: started pid", timeout=DEADLINE)
        wait_for(lambda: len(rx_log_lines(sup, "failing: started pid")) >= 2, what="failing's retry")
        line = rx_log_lines(sup, "failing: exit 3: failed start 1, retrying in")[0]
        delay = float(re.search(r"retrying in ([\d.]+)s", line).group(1))
        took, crossed = self.span(sup, "failing: exit 3: failed start 1", "failing: started pid")
        self.assertTrue(crossed, "the re-exec came after the retry: the machine is too slow")
        self.assertGreaterEqual(took, delay - 0.01)
        self.assertLess(took, delay + 0.5)
        # startsecs counted from the original start
        sup.wait_state("slowstart", "RUNNING")
        took, crossed = self.span(sup, "slowstart: started pid", "slowstart: running (pid")
        self.assertTrue(crossed, "the re-exec came after startsecs: the machine is too slow")
        self.assertGreaterEqual(took, 7.9)     # the clock starts before the "started" line
        self.assertLess(took, 8.5)
        wait_for(lambda: not zombies_of(sup.proc.pid), what="no zombie left")
        self.assertEqual(sup.terminate(), 0)


class TestInternalError(ReexecCase):
    """A bug in a handler is logged with its place, and supervision goes on."""

    def test_an_exception_in_a_handler_does_not_end_supervision(self):
        sup = self.sup("[program:boom]\ncommand = sleep 1000\nstartsecs = 0\nstopwaitsecs = 1\n"
                       "[program:steady]\ncommand = sleep 1001\nstartsecs = 0\n")
        rx_write_file(sup.script, patched(read_text(sup.script), "    def on_child_exit(self, pid, status, svc):\n",
                                          "    def on_child_exit(self, pid, status, svc):\n"
                                          "        if svc.name == 'boom':\n"
                                          "            raise RuntimeError('injected')\n"))
        sup.start()
        boom = sup.wait_state("boom", "RUNNING")["pid"]
        steady = sup.wait_state("steady", "RUNNING")["pid"]
        os.kill(boom, signal.SIGKILL)
        sup.wait_log("internal error at")
        self.assertIn("(on_child_exit): RuntimeError: injected; supervision goes on", sup.stderr())
        self.assertIsNone(sup.proc.poll())
        os.kill(steady, signal.SIGKILL)           # the others are still supervised
        sup.wait_pid_change("steady", steady)
        # boom's exit was lost in the faulty handler: a stop finds it gone, not waits forever
        self.assertEqual(sup.terminate(internal_errors=True), 0)
        self.assertIn("boom: pid %d is gone but its exit was not handled" % boom, sup.stderr())


class TestReexecFromAnOlderRelease(ReexecCase):
    """A state without the parsed sections (an older release) is still taken:
    the new image parses the carried config text instead."""

    def test_state_without_sections_is_parsed_from_the_config_text(self):
        sup = self.sup(SLEEPERS)
        base = read_text(sup.script)
        older = patched(base, '"sections": {"format": SECTIONS_FORMAT, "sections": sup.config.sections}},',
                        '"sections": None},')
        rx_write_file(sup.script, with_version(older, "0.9.0"))
        sup.start()
        sup.wait_state("a", "RUNNING")
        sup.wait_state("b", "RUNNING")
        before = self.pids(sup)
        install_by_rename(sup.script, with_version(base, "9.9.9"))
        st = self.wait_reexecs(sup, 1, "9.9.9")
        self.assertEqual(self.pids(sup), before)
        self.assertEqual({s["state"] for s in st["services"]}, {"RUNNING"})
        self.assertIn("0.9.0", rx_log_lines(sup, "re-executed: version")[-1])
        # and the next re-exec, now with the sections handed over
        install_by_rename(sup.script, with_version(base, "9.9.8"))
        self.wait_reexecs(sup, 2, "9.9.8")
        self.assertEqual(self.pids(sup), before)
        os.kill(before["a"], signal.SIGKILL)          # policy still applies
        sup.wait_pid_change("a", before["a"])
        self.assertEqual(sup.terminate(), 0)

    def test_code_that_reads_only_json_gets_json_both_ways(self):
        # a release before the marshal state (its module does not name
        # HANDOFF_MARSHAL, and its reader is JSON's): a re-exec into it from this
        # code hands JSON over, and it hands JSON to this code too
        sup = self.sup(SLEEPERS)
        base = read_text(sup.script)
        older = patched(base, "    if data.startswith(HANDOFF_MARSHAL):", "    if False:")
        older = older.replace("HANDOFF_MARSHAL", "HANDOFF_UNREAD")
        self.assertNotIn("HANDOFF_MARSHAL", older)
        sup.start()
        sup.wait_state("a", "RUNNING")
        sup.wait_state("b", "RUNNING")
        before = self.pids(sup)
        install_by_rename(sup.script, with_version(older, "1.0.9"))
        self.wait_reexecs(sup, 1, "1.0.9")
        self.assertEqual(rx_log_lines(sup, "re-exec refused"), [])
        self.assertEqual(self.pids(sup), before)
        install_by_rename(sup.script, with_version(base, "9.9.7"))
        self.wait_reexecs(sup, 2, "9.9.7")
        self.assertEqual(self.pids(sup), before)
        os.kill(before["a"], signal.SIGKILL)          # policy still applies
        sup.wait_pid_change("a", before["a"])
        self.assertEqual(sup.terminate(), 0)


# ---------------------------------------------------------------------------
# 9. Config reload: SIGHUP, `reload`, watch_config; and what a re-exec does not do
# ---------------------------------------------------------------------------

RELOAD_BASE = """
[program:keep]
command = sleep 1010
startsecs = 0.2
[program:change]
command = sleep 1011
startsecs = 0.2
[program:remove]
command = sleep 1012
startsecs = 0.2
[program:policy]
command = sleep 1013
startsecs = 0.2
autorestart = true
startretries = 3
backoff = 1
stopwaitsecs = 10
"""

RELOAD_NEW = """
[program:keep]
command = sleep 1010
startsecs = 0.2
[program:change]
command = sleep 1014
startsecs = 0.2
[program:policy]
command = sleep 1013
startsecs = 0.2
autorestart = false
startretries = 5
backoff = 0.5
stopwaitsecs = 1
[program:add]
command = sleep 1015
startsecs = 0.2
"""

RELOAD_BAD = RELOAD_NEW.replace("command = sleep 1010", "comand = sleep 1010").replace(
    "backoff = 0.5", "backoff = soon")


class TestReload(ReexecCase):
    def start_base(self, head=""):
        sup = self.sup(head + RELOAD_BASE)
        sup.start()
        for name in ("keep", "change", "remove", "policy"):
            sup.wait_state(name, "RUNNING")
        return sup, self.pids(sup)

    def assert_new_applied(self, sup, before, reexecs=0):
        """RELOAD_BASE -> RELOAD_NEW, exactly."""
        sup.wait_state("add", "RUNNING")
        changed = sup.wait_pid_change("change", before["change"])
        wait_for(lambda: "remove" not in self.pids(sup), what="remove to leave the status")
        wait_for(lambda: not pid_alive(before["remove"]), what="remove's process to stop")
        after = self.pids(sup)
        self.assertEqual(sorted(after), ["add", "change", "keep", "policy"])
        self.assertEqual(after["keep"], before["keep"])
        self.assertEqual(after["policy"], before["policy"])
        self.assertEqual(after["change"], changed["pid"])
        self.assertEqual(self.status(sup)["supervisor"]["reexecs"], reexecs)
        # the new policy holds for the running process: no restart after an exit
        os.kill(after["policy"], signal.SIGKILL)
        st = sup.wait_state("policy", "EXITED")
        self.assertEqual(st["exitstatus"], -9)
        return after

    def test_sighup_applies_the_difference_and_reload_reverts_it(self):
        sup, before = self.start_base()
        sup.write_config(RELOAD_NEW)
        sup.proc.send_signal(signal.SIGHUP)
        after = self.assert_new_applied(sup, before)
        line = rx_log_lines(sup, "reloaded ")[-1]
        for part in ("added add", "removed remove", "restarted change", "updated policy", "unchanged keep"):
            self.assertIn(part, line)
        # back again with the `reload` command
        sup.write_config(RELOAD_BASE)
        p = sup.ctl("reload")
        self.assertEqual(p.returncode, 0, p.stdout + p.stderr)
        for part in ("added: remove", "removed: add", "restarted: change", "updated: policy"):
            self.assertIn(part, p.stdout)
        sup.wait_state("remove", "RUNNING")
        sup.wait_pid_change("change", after["change"])
        wait_for(lambda: "add" not in self.pids(sup), what="add to leave the status")
        wait_for(lambda: not pid_alive(after["add"]), what="add's process to stop")
        self.assertEqual(self.pids(sup)["keep"], before["keep"])
        # policy is EXITED; a policy-only change does not start it behind the operator's back
        self.assertEqual(sup.svc("policy")["state"], "EXITED")
        self.assertEqual(sup.terminate(), 0)

    def test_a_service_put_back_while_it_is_still_stopping_starts_again(self):
        text = ("[program:slow]\ncommand = {py} {dir}/ignore_term.py {dir}/slow.ready\n"
                "startsecs = 0.2\nstopwaitsecs = 2\n" + SLEEPERS)
        sup = self.sup(text)
        rx_write_file(sup.path("ignore_term.py"), IGNORE_TERM_PY)
        sup.start()
        wait_for(lambda: os.path.exists(sup.path("slow.ready")), what="slow to ignore SIGTERM")
        old = sup.svc("slow")["pid"]
        sup.write_config(SLEEPERS)
        self.assertIn("removed: slow", sup.ctl("reload").stdout)
        sup.wait_state("slow", "STOPPING")
        sup.write_config(text)
        self.assertIn("added: slow", sup.ctl("reload").stdout)
        # the old process is killed at stopwaitsecs, then slow starts again, in the config
        new = sup.wait_pid_change("slow", old)
        wait_for(lambda: not pid_alive(old), what="the old process to go")
        sup.wait_state("slow", "RUNNING")
        self.assertEqual(sup.svc("slow")["pid"], new["pid"])
        self.assertEqual(sup.terminate(), 0)

    def test_bad_config_is_rejected_with_the_lines_of_check(self):
        sup, before = self.start_base()
        sup.write_config(RELOAD_BAD)
        check = sup.ctl("check")
        self.assertEqual(check.returncode, 2)
        errors = [l for l in check.stdout.splitlines() if ": warning: " not in l]
        self.assertGreaterEqual(len(errors), 2, check.stdout)
        p = sup.ctl("reload")
        self.assertEqual(p.returncode, 1)
        self.assertEqual(p.stderr.splitlines()[:len(errors)], errors)
        sup.proc.send_signal(signal.SIGHUP)
        wait_for(lambda: len(rx_log_lines(sup, "reload rejected: ")) == 2 * len(errors),
                 what="the rejection in the log")
        self.assertEqual([l.split("reload rejected: ", 1)[1] for l in rx_log_lines(sup, "reload rejected: ")],
                         errors * 2)
        self.assertEqual(self.pids(sup), before)
        self.assertEqual({s["state"] for s in self.status(sup)["services"]}, {"RUNNING"})
        self.assertEqual(sup.terminate(), 0)

    def test_watch_config_reloads_when_the_file_changes(self):
        sup, before = self.start_base("[respawn]\nwatch_config = true\n\n")
        sup.write_config("[respawn]\nwatch_config = true\n\n" + RELOAD_NEW)
        sup.wait_log("the config changed on disk: reloading")
        self.assert_new_applied(sup, before)
        # watching switched off, then on again by a `reload`: it watches again
        sup.write_config("[respawn]\nwatch_config = false\nwatch_self = false\n\n" + RELOAD_NEW)
        wait_for(lambda: len(rx_log_lines(sup, "the config changed on disk: reloading")) == 2,
                 what="the second change to be seen")
        sup.write_config("[respawn]\nwatch_config = true\nwatch_self = false\n\n" + RELOAD_NEW)
        self.assertEqual(sup.ctl("reload").returncode, 0)
        sup.write_config("[respawn]\nwatch_config = true\nwatch_self = false\n\n" + RELOAD_NEW
                         + "[program:late]\ncommand = sleep 1016\nstartsecs = 0.2\n")
        wait_for(lambda: "late" in self.pids(sup), what="the third change to be seen")
        sup.wait_state("late", "RUNNING")
        self.assertEqual(len(rx_log_lines(sup, "the config changed on disk: reloading")), 3)

    def test_config_changed_on_disk_is_not_applied_by_a_reexec(self):
        sup, before = self.start_base()
        sup.write_config(RELOAD_NEW)
        self.assertTrue(self.reexec(sup)["ok"])
        st = self.wait_reexecs(sup, 1)
        self.assertEqual(self.pids(sup), before)
        self.assertEqual({s["state"] for s in st["services"]}, {"RUNNING"})
        # even a config on disk that is broken does not stop an upgrade: the trial
        # checks the config in effect
        sup.write_config(RELOAD_BAD)
        install_by_rename(sup.script, with_version(read_text(sup.script), "9.9.9"))
        self.wait_reexecs(sup, 2, "9.9.9")
        self.assertEqual(self.pids(sup), before)
        # the change on disk was good all along: a reload applies it
        sup.write_config(RELOAD_NEW)
        sup.proc.send_signal(signal.SIGHUP)
        self.assert_new_applied(sup, before, reexecs=2)
        self.assertEqual(sup.terminate(), 0)


# ---------------------------------------------------------------------------
# A container entrypoint (issue 5) and readiness, dependencies, health (issue 6)
# ---------------------------------------------------------------------------

# ---------------------------------------------------------------------------
# PID 1 and subreaper (issue 5)
# ---------------------------------------------------------------------------

UNSHARE = ["unshare", "--pid", "--fork", "--mount-proc"]


def _unshare_problem():
    """None when this machine lets us run a PID namespace, else why not (probed once)."""
    try:
        p = subprocess.run(UNSHARE + ["sh", "-c", "echo $$"], stdout=subprocess.PIPE,
                           stderr=subprocess.STDOUT, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError) as exc:
        return "unshare cannot run here: %s" % exc
    if p.returncode != 0 or p.stdout.strip() != "1":
        return "unshare --pid --fork --mount-proc is not permitted here: %s" % p.stdout.strip()[-200:]
    return None


UNSHARE_PROBLEM = _unshare_problem() if sys.platform.startswith("linux") else "not Linux"


def proc_fields(pid):
    """/proc/PID/status as a dict of strings, or None once the process is gone."""
    try:
        with open("/proc/%d/status" % pid) as f:
            return dict(line.rstrip("\n").split(":\t", 1) for line in f if ":\t" in line)
    except OSError:
        return None


def ns_processes(init_pid):
    """Every process in the PID namespace of init_pid (an outside pid), seen from outside:
    {inner pid: (outer pid, state letter, outer ppid)}.  Zombies included."""
    try:
        ns = os.readlink("/proc/%d/ns/pid" % init_pid)
    except OSError:
        return {}
    found = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        pid = int(name)
        try:
            if os.readlink("/proc/%d/ns/pid" % pid) != ns:
                continue
            with open("/proc/%d/stat" % pid) as f:
                fields = f.read().rsplit(")", 1)[1].split()
            st = proc_fields(pid)
        except OSError:
            continue
        if st is None or "NSpid" not in st:
            continue
        inner = int(st["NSpid"].split()[-1])
        found[inner] = (pid, fields[0], int(fields[1]))
    return found


class NsSup(Sup):
    """A supervisor run as PID 1 of a new PID namespace (`unshare --pid --fork --mount-proc`).

    The control socket works from outside; the pids it reports are the namespace's, so
    they are never used as outside pids (Sup.cleanup would kill_group them: it must not).
    unshare(1) 2.38 does not forward TERM to its child, so signals go to the namespace's
    PID 1 by its outside pid, as `docker stop` does."""

    def start(self, *extra, wait=True):
        return super().start(*extra, wait=wait, prefix=UNSHARE)

    def status(self):
        reply = super().status()
        self.seen.clear()      # namespace pids: meaningless outside
        return reply

    def init_pid(self):
        """The outside pid of the namespace's PID 1 (the supervisor)."""
        if getattr(self, "_init", None):
            return self._init

        def find():
            for name in os.listdir("/proc"):
                if not name.isdigit():
                    continue
                try:
                    with open("/proc/%s/stat" % name) as f:
                        ppid = int(f.read().rsplit(")", 1)[1].split()[1])
                except (OSError, IndexError, ValueError):
                    continue
                if ppid == self.proc.pid:
                    st = proc_fields(int(name))
                    if st and st.get("NSpid", "").split()[-1:] == ["1"]:
                        return int(name)
            return None
        self._init = wait_for(find, what="the namespace's PID 1")
        return self._init

    def signal_init(self, sig):
        os.kill(self.init_pid(), sig)

    def wait_exit(self, timeout=DEADLINE):
        return self.proc.wait(timeout)

    def cleanup(self):
        self.seen.clear()
        if self.proc is not None and self.proc.poll() is None:
            # PID 1 shares unshare's process group (our session, held while unshare is not
            # reaped); when a namespace's init dies the kernel kills everything in it
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.proc.wait(10)
        super().cleanup()


class OwnSup(Sup):
    """Sup whose cleanup kills only process groups that are still this test's: with
    pid_max 32768 and fork-heavy tests running alongside, a pid seen earlier may be
    someone else's by cleanup time.  Our services run in the test's folder."""

    def cleanup(self):
        mine = os.path.realpath(self.dir)
        self.seen = {p: t for p, t in self.seen.items() if cwd_of(p) == mine}
        super().cleanup()


def cwd_of(pid):
    try:
        return os.readlink("/proc/%d/cwd" % pid)
    except OSError:
        return None


# A service that double-forks COUNT grandchildren: each waits to be orphaned, records
# "its-pid its-new-ppid", waits for GO to exist, then exits with a code of its own.
ORPHANS_PY = r"""
import os, sys, time
count, out, go = int(sys.argv[1]), sys.argv[2], sys.argv[3]
for i in range(count):
    pid = os.fork()
    if pid == 0:
        mid = os.getpid()
        if os.fork() == 0:
            while os.getppid() == mid:
                time.sleep(0.005)
            fd = os.open(out, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
            os.write(fd, b"%d %d\n" % (os.getpid(), os.getppid()))
            os.close(fd)
            while not os.path.exists(go):
                time.sleep(0.01)
            os._exit(i % 5)
        os._exit(0)
    os.waitpid(pid, 0)
while True:
    time.sleep(1000)
"""

# A service that makes orphans without end: every round, 5 grandchildren that exit at once.
CHURN_PY = r"""
import os, sys, time
out = sys.argv[1]
n = 0
while True:
    for i in range(5):
        pid = os.fork()
        if pid == 0:
            if os.fork() == 0:
                os._exit(i)
            os._exit(0)
        os.waitpid(pid, 0)
    n += 1
    with open(out, "w") as f:
        f.write(str(n))
    time.sleep(0.01)
"""

# A service that records when it started and when it got its stop signal.
RECORD_PY = r"""
import os, signal, sys, time
name, out = sys.argv[1], sys.argv[2]
def note(what):
    fd = os.open(out, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    os.write(fd, ("%s %s %.6f\n" % (name, what, time.time())).encode())
    os.close(fd)
def on_term(signum, frame):
    note("stop")
    sys.exit(0)
signal.signal(signal.SIGTERM, on_term if "--ignore-term" not in sys.argv else signal.SIG_IGN)
note("start")
while True:
    time.sleep(1000)
"""


def read_or_empty(path, default=""):
    try:
        with open(path) as f:
            return f.read()
    except OSError:
        return default


def write_text(path, text):
    with open(path, "w") as f:
        f.write(text)


def recorded(path):
    """[(name, what, time)] from RECORD_PY's file."""
    try:
        with open(path) as f:
            return [(a, b, float(c)) for a, b, c in (line.split() for line in f if line.strip())]
    except OSError:
        return []


def p1_holds(predicate, seconds, what):
    """Assert that a condition stays true for a while (a state that must not change yet)."""
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        value = predicate()
        if not value:
            raise AssertionError("%s stopped holding" % what)
        time.sleep(0.02)
    return True


@unittest.skipIf(UNSHARE_PROBLEM, UNSHARE_PROBLEM or "")
class TestPid1(unittest.TestCase):
    """The supervisor as PID 1 of a PID namespace: reaping, signals, exit codes."""

    def ns_sup(self, config):
        sup = NsSup(self, config)
        write_text(sup.path("orphans.py"), ORPHANS_PY)
        write_text(sup.path("churn.py"), CHURN_PY)
        write_text(sup.path("record.py"), RECORD_PY)
        return sup

    def assert_no_zombie(self, sup):
        """Every zombie under PID 1 is reaped soon: a service that just exited may be a
        zombie for an instant, but none stays (pids are not reused that fast)."""
        init = sup.init_pid()
        seen = set(zombies_of(init))
        wait_for(lambda: not seen & set(zombies_of(init)), what="no zombie left under PID 1")

    def test_fifty_orphans_reaped_while_statuses_and_restarts_stay_exact(self):
        sup = self.ns_sup("""
            [program:orphans]
            command = {py} {dir}/orphans.py 50 {dir}/orphans.txt {dir}/go
            startsecs = 0.2

            [program:churn]
            command = {py} {dir}/churn.py {dir}/churn.txt
            startsecs = 0.2
            autostart = false

            [program:seven]
            command = sh -c 'exit 7'
            startsecs = 1
            startretries = forever
            backoff = 0.05
            backoff_max = 0.1

            [program:selfkill]
            command = sh -c 'kill -USR1 $$'
            startsecs = 1
            startretries = forever
            backoff = 0.05
            backoff_max = 0.1

            [program:probed]
            command = sleep 1000
            ready = exec:test -e {dir}/probe-ok
            ready_timeout = 60
        """)
        sup.start()
        self.assertEqual(sup.status()["supervisor"]["pid"], 1)
        init = sup.init_pid()
        orphans = sup.wait_state("orphans", "RUNNING")
        # fifty grandchildren, each re-parented to PID 1 once its parent exits
        lines = wait_for(lambda: (lambda t: t if len(t) == 50 else None)(
            read_or_empty(sup.path("orphans.txt")).split("\n")[:-1]), what="fifty orphans")
        inner = {int(line.split()[0]) for line in lines}
        self.assertEqual({line.split()[1] for line in lines}, {"1"}, "orphans adopted by PID 1")
        alive = ns_processes(init)
        self.assertTrue(inner <= set(alive), "the orphans run inside the namespace")
        write_text(sup.path("go"), "")
        # all fifty exit at once: every one reaped (gone, not a zombie), none left behind
        wait_for(lambda: not (inner & set(ns_processes(init))), what="the fifty orphans reaped")
        self.assert_no_zombie(sup)
        self.assertEqual((sup.svc("orphans")["state"], sup.svc("orphans")["pid"]),
                         ("RUNNING", orphans["pid"]))

        # now orphans are made and reaped all the time while two services exit and restart
        self.assertEqual(sup.ctl("start", "churn").returncode, 0)
        seen = {"seven": set(), "selfkill": set()}
        restarts0 = {n: sup.svc(n)["restarts"] for n in seen}

        def enough():
            for s in sup.status()["services"]:
                if s["name"] in seen and s["state"] == "BACKOFF":
                    seen[s["name"]].add(s["exitstatus"])
            rounds = int(read_or_empty(sup.path("churn.txt")) or 0)
            counts = {n: sup.svc(n)["restarts"] - restarts0[n] for n in seen}
            return rounds >= 30 and min(counts.values()) >= 8 and all(seen.values())
        wait_for(enough, what="restarts while orphans are reaped", interval=0.01)
        self.assertEqual(seen, {"seven": {7}, "selfkill": {-signal.SIGUSR1}})
        # every exit the policy saw carried its real status: none lost to the orphan reaper
        log = sup.stderr()
        self.assertGreaterEqual(len(re.findall(r"seven: exit 7: failed start", log)), 8)
        self.assertGreaterEqual(len(re.findall(r"selfkill: killed by SIGUSR1: failed start", log)), 8)
        self.assertNotIn("seven: not started", log)
        self.assertNotIn("lost", log)
        # an exec: probe that fails (exit 1) keeps its service STARTING despite the reaper
        self.assertEqual(sup.svc("probed")["state"], "STARTING")
        write_text(sup.path("probe-ok"), "")
        sup.wait_state("probed", "RUNNING")
        self.assertEqual(sup.ctl("stop", "churn").returncode, 0)
        self.assert_no_zombie(sup)
        sup.signal_init(signal.SIGTERM)
        self.assertEqual(sup.wait_exit(), 0)

    def test_term_to_pid1_stops_everything_in_order_and_exits_0(self):
        sup = self.ns_sup("""
            [program:db]
            command = {py} {dir}/record.py db {dir}/rec.txt
            priority = 1
            startsecs = 0.2
            stopwaitsecs = 2

            [program:app]
            command = {py} {dir}/record.py app {dir}/rec.txt
            priority = 2
            startsecs = 0.2
            stopwaitsecs = 2

            [program:web]
            command = {py} {dir}/record.py web {dir}/rec.txt
            priority = 3
            startsecs = 0.2
            stopwaitsecs = 2

            [program:stubborn]
            command = {py} {dir}/record.py stubborn {dir}/rec.txt --ignore-term
            priority = 4
            startsecs = 0.2
            stopwaitsecs = 1
        """)
        sup.start()
        for name in ("db", "app", "web", "stubborn"):
            sup.wait_state(name, "RUNNING")
        wait_for(lambda: len([r for r in recorded(sup.path("rec.txt")) if r[1] == "start"]) == 4,
                 what="four services started")
        init = sup.init_pid()
        sup.signal_init(signal.SIGTERM)
        t0 = time.monotonic()
        self.assertEqual(sup.wait_exit(), 0)
        # docker stop waits 10 s before its KILL: we must be done before that
        self.assertLess(time.monotonic() - t0, 10)
        stops = [r[0] for r in recorded(sup.path("rec.txt")) if r[1] == "stop"]
        self.assertEqual(stops, ["web", "app", "db"])     # stubborn ignored TERM and was killed
        log = sup.stderr()
        self.assertIn("stubborn: still alive after 1s: SIGKILL", log)
        self.assertIn("got SIGTERM: stopping every service", log)
        self.assertLess(log.index("stubborn: stopped"), log.index("web: stopping"))
        self.assertFalse(pid_alive(init))
        self.assertFalse(os.path.exists("/proc/%d" % init))

    def test_every_signal_is_handled_as_pid1(self):
        sup = self.ns_sup("""
            [program:keep]
            command = sh -c 'echo line-one; exec sleep 1000'
            startsecs = 0.2
            stdout_logfile = {dir}/keep.log
        """)
        sup.start()
        keep = sup.wait_state("keep", "RUNNING")
        init = sup.init_pid()
        # USR1 reopens log files (logrotate moved the file away)
        wait_for(lambda: os.path.exists(sup.path("keep.log")), what="keep.log")
        os.rename(sup.path("keep.log"), sup.path("keep.log.1"))
        sup.signal_init(signal.SIGUSR1)
        sup.wait_log("got SIGUSR1: reopening log files")
        wait_for(lambda: os.path.exists(sup.path("keep.log")), what="keep.log reopened")
        # USR2 re-executes PID 1 in place: still PID 1, same service process
        sup.signal_init(signal.SIGUSR2)
        wait_for(lambda: sup.status()["supervisor"]["reexecs"] == 1, what="the re-exec")
        self.assertEqual(sup.status()["supervisor"]["pid"], 1)
        self.assertEqual(sup.init_pid(), init)
        after = sup.svc("keep")
        self.assertEqual((after["pid"], after["state"], after["restarts"]),
                         (keep["pid"], "RUNNING", keep["restarts"]))
        # HUP reloads: a new service (it makes orphans) starts, keep is untouched
        with open(sup.config, "a") as f:
            f.write("\n[program:orphans]\ncommand = %s %s 20 %s %s\nstartsecs = 0.2\n" % (
                PY, sup.path("orphans.py"), sup.path("o.txt"), sup.path("go")))
        write_text(sup.path("go"), "")
        sup.signal_init(signal.SIGHUP)
        sup.wait_state("orphans", "RUNNING")
        self.assertEqual(sup.svc("keep")["pid"], keep["pid"])
        # the re-exec'd PID 1 still reaps orphans
        wait_for(lambda: len(read_or_empty(sup.path("o.txt")).split()) == 40, what="twenty orphans")
        inner = {int(x.split()[0]) for x in read_or_empty(sup.path("o.txt")).splitlines()}
        wait_for(lambda: not (inner & set(ns_processes(init))), what="the twenty orphans reaped")
        self.assert_no_zombie(sup)
        # INT stops everything and exits 0
        sup.signal_init(signal.SIGINT)
        self.assertEqual(sup.wait_exit(), 0)
        self.assertIn("got SIGINT: stopping every service", sup.stderr())

    def test_quit_as_pid1_and_json_log_format(self):
        sup = self.ns_sup("""
            [respawn]
            log_format = json

            [program:talk]
            command = sh -c 'echo "hello out"; echo "hello err" >&2; printf "no newline"; exec sleep 1000'
            startsecs = 0.2
        """)
        sup.start()
        sup.wait_state("talk", "RUNNING")
        sup.wait_log('"hello out"', stream="stdout")
        sup.wait_log('"hello err"')
        sup.signal_init(signal.SIGQUIT)
        self.assertEqual(sup.wait_exit(), 0)
        out = [json.loads(line) for line in sup.stdout().splitlines()]
        for obj in out:
            self.assertTrue({"time", "service", "stream", "message"} <= set(obj), obj)
            self.assertIsInstance(obj["time"], float)
        self.assertIn({"service": "talk", "stream": "stdout", "message": "hello out"},
                      [{k: o[k] for k in ("service", "stream", "message")} for o in out])
        # the partial line is written, whole, when the service is stopped
        self.assertIn("no newline", [o["message"] for o in out])
        err = [json.loads(line) for line in sup.stderr().splitlines() if line.startswith("{")]
        self.assertEqual(len(err), len([x for x in sup.stderr().splitlines() if x.strip()]),
                         "every stderr line is one JSON object")
        self.assertIn(("talk", "stderr", "hello err"),
                      [(o["service"], o["stream"], o["message"]) for o in err])
        self.assertTrue(any(o["stream"] == "supervisor" and "got SIGQUIT" in o["message"]
                            for o in err))

    def test_exit_on_fatal_exits_1(self):
        sup = self.ns_sup("""
            [respawn]
            exit_on_fatal = true

            [program:good]
            command = {py} {dir}/record.py good {dir}/rec.txt
            startsecs = 0.2

            [program:bad]
            command = sh -c 'test -e {dir}/break && exit 3; exec sleep 1000'
            startsecs = 0.5
            startretries = 1
            backoff = 0.05
            backoff_max = 0.1
            autorestart = true
        """)
        sup.start()
        sup.wait_state("good", "RUNNING")
        sup.wait_state("bad", "RUNNING")
        write_text(sup.path("break"), "")
        sup.ctl("signal", "KILL", "bad")
        self.assertEqual(sup.wait_exit(), 1)
        log = sup.stderr()
        self.assertIn("exit_on_fatal: stopping everything", log)
        self.assertRegex(log, r"bad: exit 3; gave up after 2 failed starts")
        self.assertEqual([r[0] for r in recorded(sup.path("rec.txt")) if r[1] == "stop"],
                         ["good"])

    def test_one_shots_exit_code_says_whether_all_succeeded(self):
        for codes, expected in (((0, 0), 0), ((0, 4), 1)):
            with self.subTest(codes=codes):
                sup = self.ns_sup("""
                    [program:one]
                    command = sh -c 'exit %d'
                    autorestart = false
                    startsecs = 0

                    [program:two]
                    command = sh -c 'test -e {dir}/go || sleep 0.3; exit %d'
                    autorestart = false
                    startsecs = 0
                """ % codes)
                sup.start(wait=False)
                self.assertEqual(sup.wait_exit(), expected, sup.stderr())
                self.assertIn("every service has exited; exiting %d" % expected, sup.stderr())


class TestSubreaper(unittest.TestCase):
    """subreaper = true outside a PID namespace adopts what a service double-forks."""

    DAEMON_PY = r"""
import os, sys, time
out, release = sys.argv[1], sys.argv[2]
pid = os.fork()
if pid == 0:
    os.setsid()
    mid = os.getpid()
    if os.fork() == 0:
        while os.getppid() == mid:
            time.sleep(0.005)
        with open(out + ".tmp", "w") as f:
            f.write("%d %d" % (os.getpid(), os.getppid()))
        os.rename(out + ".tmp", out)
        while not os.path.exists(release):
            time.sleep(0.01)
        os._exit(3)
    os._exit(0)
os.waitpid(pid, 0)
while True:
    time.sleep(1000)
"""

    def test_subreaper_adopts_and_reaps_double_forked_child_across_reexec(self):
        sup = OwnSup(self, """
            [respawn]
            subreaper = true

            [program:daemon]
            command = {py} {dir}/daemon.py {dir}/grandchild {dir}/release
            startsecs = 0.2
        """)
        write_text(sup.path("daemon.py"), self.DAEMON_PY)
        sup.start()
        self.assertNotEqual(sup.proc.pid, 1)
        grandchildren = []
        self.addCleanup(lambda: [os.kill(p, signal.SIGKILL) for p in grandchildren if pid_alive(p)])
        for round_ in (1, 2):
            sup.wait_state("daemon", "RUNNING")
            gpid, ppid = map(int, wait_for(lambda: read_or_empty(sup.path("grandchild")).split(),
                                           what="the grandchild"))
            grandchildren.append(gpid)
            self.assertEqual(ppid, sup.proc.pid, "adopted by the supervisor, not by init")
            self.assertEqual(int(read_or_empty("/proc/%d/stat" % gpid).rsplit(")", 1)[1].split()[1]),
                             sup.proc.pid)
            write_text(sup.path("release"), "")
            wait_for(lambda: not os.path.exists("/proc/%d" % gpid), what="the grandchild reaped")
            wait_for(lambda: not zombies_of(sup.proc.pid), what="no zombie left")
            self.assertEqual(sup.svc("daemon")["state"], "RUNNING")
            os.unlink(sup.path("release"))
            os.unlink(sup.path("grandchild"))
            if round_ == 1:
                # the subreaper flag survives a re-exec (prctl is kept across execve)
                self.assertEqual(sup.ctl("reexec").returncode, 0)
                self.assertEqual(sup.status()["supervisor"]["reexecs"], 1)
                old = sup.svc("daemon")["pid"]
                self.assertEqual(sup.ctl("restart", "daemon").returncode, 0)
                sup.wait_pid_change("daemon", old)
        self.assertEqual(sup.terminate(), 0)



# ---------------------------------------------------------------------------
# Dependencies, readiness and health (issue 6)
# ---------------------------------------------------------------------------

# An sd_notify service: sends what the test drops into DIR/NAME.msg (then deletes it),
# READY=1 at once with --ready-now, WATCHDOG=1 every 50 ms while DIR/NAME.ping exists,
# and with --once MSG only sends MSG and exits (as systemd-notify would).
NOTIFY_PY = r"""
import os, socket, sys, time
name, d = sys.argv[1], sys.argv[2]
addr = os.environ["NOTIFY_SOCKET"]
if addr.startswith("@"):
    addr = "\0" + addr[1:]
s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
def send(msg):
    s.sendto(msg.encode(), addr)
if "--once" in sys.argv:
    send(sys.argv[sys.argv.index("--once") + 1])
    sys.exit(0)
if "--ready-now" in sys.argv:
    send("READY=1")
box, ping = os.path.join(d, name + ".msg"), os.path.join(d, name + ".ping")
while True:
    try:
        with open(box) as f:
            msg = f.read()
        os.unlink(box)
        send(msg)
    except FileNotFoundError:
        pass
    if "--ping" in sys.argv and os.path.exists(ping):
        send("WATCHDOG=1")
    time.sleep(0.05)
"""

# A TCP service on PORT: binds once DIR/NAME.bind exists (with --wait-bind), answers
# every connection, and closes its listening socket for good (while it lives on) when
# DIR/NAME.close appears.
SERVE_PY = r"""
import os, select, socket, sys, time
port, d, name = int(sys.argv[1]), sys.argv[2], sys.argv[3]
if "--wait-bind" in sys.argv:
    while not os.path.exists(os.path.join(d, name + ".bind")):
        time.sleep(0.02)
ls = socket.socket()
ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
ls.bind(("127.0.0.1", port))
ls.listen(16)
close = os.path.join(d, name + ".close")
while True:
    if select.select([ls], [], [], 0.05)[0]:
        ls.accept()[0].close()
    if os.path.exists(close):
        os.unlink(close)
        ls.close()
        while True:
            time.sleep(1000)
"""


def free_port():
    """A free TCP port below the ephemeral range: ports from bind(0) are handed out to
    the other tests running at the same time too."""
    try:
        low = int(read_or_empty("/proc/sys/net/ipv4/ip_local_port_range").split()[0])
    except (IndexError, ValueError):
        low = 32768
    for _ in range(200):
        port = random.randrange(10000, low) if low > 11000 else 0
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return s.getsockname()[1]
    raise AssertionError("no free port")


def port_accepts(port):
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
        return True
    except OSError:
        return False


def drop(sup, name, suffix, text=""):
    """Create DIR/NAME.SUFFIX atomically (the services poll for it)."""
    tmp = sup.path(".%s.%s.tmp" % (name, suffix))
    write_text(tmp, text)
    os.rename(tmp, sup.path("%s.%s" % (name, suffix)))


def notify(sup, name, message):
    """Have service NAME send an sd_notify message; returns once it has been sent."""
    drop(sup, name, "msg", message)
    wait_for(lambda: not os.path.exists(sup.path(name + ".msg")), what="%s to send %r" % (name, message))


class ReadinessCase(unittest.TestCase):
    def sup(self, config, **kw):
        sup = OwnSup(self, config, **kw)
        for name, text in (("record.py", RECORD_PY), ("notify.py", NOTIFY_PY), ("serve.py", SERVE_PY)):
            write_text(sup.path(name), text)
        return sup


class TestDependencies(ReadinessCase):
    def test_chain_starts_in_order_stops_in_reverse_and_unrelated_start_together(self):
        # priorities say c, b, a: requires wins (SPEC), both ways
        sup = self.sup("""
            [program:a]
            command = {py} {dir}/record.py a {dir}/rec.txt
            priority = 3
            startsecs = 0.4

            [program:b]
            command = {py} {dir}/record.py b {dir}/rec.txt
            requires = a
            priority = 2
            startsecs = 0.4

            [program:c]
            command = {py} {dir}/record.py c {dir}/rec.txt
            requires = b
            priority = 1
            startsecs = 0.4

            [program:x]
            command = {py} {dir}/record.py x {dir}/rec.txt
            startsecs = 1

            [program:y]
            command = {py} {dir}/record.py y {dir}/rec.txt
            startsecs = 1
        """)
        sup.start()
        for name in "abcxy":
            sup.wait_state(name, "RUNNING")
        started = {s["name"]: s["started"] for s in sup.status()["services"]}
        # each waits until what it requires is ready (alive startsecs = 0.4 s)
        log = sup.stderr()
        self.assertLess(log.index("a: running"), log.index("b: started pid"))
        self.assertLess(log.index("b: running"), log.index("c: started pid"))
        self.assertGreaterEqual(started["b"] - started["a"], 0.2)
        self.assertGreaterEqual(started["c"] - started["b"], 0.2)
        # unrelated services start together, not one after the other's startsecs (1 s)
        self.assertLess(abs(started["x"] - started["y"]), 0.5)
        self.assertIn("b: waiting for a", log)
        self.assertIn("c: waiting for b", log)
        wait_for(lambda: len(recorded(sup.path("rec.txt"))) == 5, what="five services recorded")
        self.assertEqual(sup.terminate(), 0)
        stops = [(n, t) for n, what, t in recorded(sup.path("rec.txt")) if what == "stop"]
        order = [n for n, _ in stops if n in "abc"]
        self.assertEqual(order, ["c", "b", "a"])
        # and each had exited before the next was signalled
        full = sup.stderr()
        self.assertLess(full.index("c: stopped"), full.index("b: stopping"))
        self.assertLess(full.index("b: stopped"), full.index("a: stopping"))

    def test_requires_cycle_and_unknown_name_are_config_errors(self):
        code, out, _ = run_check(self, """
            [program:a]
            command = sleep 1
            requires = c

            [program:b]
            command = sleep 1
            requires = a

            [program:c]
            command = sleep 1
            requires = b

            [program:d]
            command = sleep 1
            requires = a, nosuch
        """)
        self.assertEqual(code, 2, out)
        m = re.search(r"c\.ini:\d+: requires cycle: (\w+) -> (\w+) -> (\w+) -> (\w+)", out)
        self.assertTrue(m, out)
        self.assertEqual(m.group(1), m.group(4))
        self.assertEqual(set(m.group(1, 2, 3)), {"a", "b", "c"})
        self.assertEqual(out.count("requires cycle"), 1, out)
        self.assertRegex(out, r"\[program:d\] requires 'nosuch', which is not a program")
        code, out, _ = run_check(self, """
            [program:a]
            command = sleep 1
            [program:b]
            command = sleep 1
            requires = a
        """)
        self.assertEqual(code, 0, out)

    def test_dependant_waits_for_a_fatal_or_stopped_requirement(self):
        sup = self.sup("""
            [program:base]
            command = sh -c 'test -e {dir}/base-ok && exec sleep 1000; exit 1'
            startsecs = 0.2
            startretries = 0
            backoff = 0.05
            backoff_max = 0.1

            [program:dep]
            command = sleep 1000
            requires = base
            startsecs = 0

            [program:db]
            command = sleep 1000
            startsecs = 0.2

            [program:app]
            command = sh -c 'while ! test -e {dir}/crash; do sleep 0.02; done; rm {dir}/crash; exit 1'
            requires = db
            startsecs = 0.2
        """)
        sup.start()
        sup.wait_state("base", "FATAL")
        sup.wait_state("app", "RUNNING")
        dep = sup.svc("dep")
        self.assertEqual((dep["state"], dep["pid"], dep["reason"]), ("STOPPED", None, "waiting for base"))
        p1_holds(lambda: sup.svc("dep")["state"] == "STOPPED", 0.4, "dep waiting")
        p = sup.ctl("status", "dep")
        self.assertEqual(p.returncode, 3, p.stdout)
        self.assertIn("waiting for base", p.stdout)
        # db is stopped by the operator; app, which requires it, exits: it waits for db
        self.assertEqual(sup.ctl("stop", "db").returncode, 0)
        write_text(sup.path("crash"), "")
        wait_for(lambda: sup.svc("app")["reason"] == "waiting for db", what="app waiting for db")
        app = sup.svc("app")
        self.assertEqual((app["state"], app["pid"]), ("STOPPED", None))
        self.assertIn("waiting for db", sup.ctl("status").stdout)
        # db back: app starts by itself
        self.assertEqual(sup.ctl("start", "db").returncode, 0)
        sup.wait_state("app", "RUNNING")
        # base repaired and started by the operator: dep follows
        self.assertEqual(sup.svc("dep")["state"], "STOPPED")
        write_text(sup.path("base-ok"), "")
        p = sup.ctl("start", "base")
        self.assertEqual(p.returncode, 0, p.stdout + p.stderr + sup.stderr())
        sup.wait_state("dep", "RUNNING")
        self.assertIn("dep: waiting for base", sup.stderr())
        self.assertEqual(sup.terminate(), 0)


class TestReadiness(ReadinessCase):
    def test_tcp_and_exec_ready_then_healthcheck_restart(self):
        port = free_port()
        sup = self.sup("""
            [program:web]
            command = {py} {dir}/serve.py %d {dir} web --wait-bind
            ready = tcp:127.0.0.1:%d
            ready_timeout = 30
            healthcheck = tcp:127.0.0.1:%d
            healthcheck_interval = 0.2
            healthcheck_failures = 2

            [program:probe]
            command = sleep 1000
            ready = exec:test -e {dir}/ready-file
            ready_timeout = 30
        """ % (port, port, port))
        sup.start()
        web = sup.wait_state("web", "STARTING")
        sup.wait_state("probe", "STARTING")
        self.assertFalse(web["ready"])
        p1_holds(lambda: sup.svc("web")["state"] == "STARTING" and sup.svc("probe")["state"] == "STARTING",
              0.6, "STARTING before the port or the file")
        self.assertFalse(port_accepts(port))
        drop(sup, "web", "bind")
        web = sup.wait_state("web", "RUNNING")
        self.assertTrue(web["ready"])
        self.assertTrue(port_accepts(port))
        self.assertEqual(sup.svc("probe")["state"], "STARTING")
        write_text(sup.path("ready-file"), "")
        self.assertTrue(sup.wait_state("probe", "RUNNING")["ready"])
        # healthy: answered probes keep it running
        p1_holds(lambda: sup.svc("web")["pid"] == web["pid"], 0.6, "web healthy")
        # the port closes while the process lives: restarted, and says why
        drop(sup, "web", "close")
        new = sup.wait_pid_change("web", web["pid"])
        self.assertTrue(pid_alive(new["pid"]))
        self.assertFalse(pid_alive(web["pid"]))
        sup.wait_log("web: restarting: healthcheck failed 2 times: tcp 127.0.0.1:%d" % port)
        self.assertIn("healthcheck failed 2 times", sup.svc("web")["reason"] or "")
        self.assertEqual(sup.svc("web")["restarts"], 1)
        sup.wait_state("web", "RUNNING")
        self.assertEqual(sup.terminate(), 0)

    def test_notify_ready_status_children_timeout_and_watchdog(self):
        sup = self.sup("""
            [program:n]
            command = {py} {dir}/notify.py n {dir}
            ready = notify
            ready_timeout = 30

            [program:kid]
            command = sh -c '{py} {dir}/notify.py kid {dir} --once READY=1; exec sleep 1000'
            ready = notify

            [program:kid2]
            command = sh -c '{py} {dir}/notify.py kid2 {dir} --ready-now & exec sleep 1000'
            ready = notify

            [program:never]
            command = {py} {dir}/notify.py never {dir}
            ready = notify
            ready_timeout = 0.5
            startretries = 1
            backoff = 0.05
            backoff_max = 0.1

            [program:wd]
            command = {py} {dir}/notify.py wd {dir} --ready-now --ping
            ready = notify
            watchdog = 1
        """)
        write_text(sup.path("wd.ping"), "")
        sup.start()
        n = sup.wait_state("n", "STARTING")
        # a READY=1 from outside the service is refused
        with open("/proc/%d/environ" % n["pid"], "rb") as f:
            env = dict(x.split(b"=", 1) for x in f.read().split(b"\0") if b"=" in x)
        address = env[b"NOTIFY_SOCKET"].decode()
        self.assertTrue(address.startswith("@"))
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
            s.sendto(b"READY=1", "\0" + address[1:])
        sup.wait_log("n: ignored a notify message from pid %d outside the service" % os.getpid())
        self.assertEqual(sup.svc("n")["state"], "STARTING")
        notify(sup, "n", "STATUS=warming up")
        wait_for(lambda: sup.svc("n")["status"] == "warming up", what="STATUS shown")
        self.assertIn("(warming up)", sup.ctl("status").stdout)
        self.assertEqual(sup.svc("n")["state"], "STARTING")
        self.assertFalse(sup.svc("n")["ready"])
        notify(sup, "n", "READY=1\nSTATUS=serving")
        n2 = sup.wait_state("n", "RUNNING")
        self.assertEqual((n2["pid"], n2["status"], n2["ready"]), (n["pid"], "serving", True))
        # READY=1 from a child process of the service, gone or still alive
        sup.wait_state("kid", "RUNNING")
        sup.wait_state("kid2", "RUNNING")
        # never READY=1: a failed start after ready_timeout, then FATAL
        never = sup.wait_state("never", "FATAL")
        self.assertIn("not ready within 0.5s", never["reason"])
        self.assertIn("never: not ready within 0.5s", sup.stderr())
        self.assertEqual(never["exitstatus"], -signal.SIGTERM)
        # the watchdog: kept alive by WATCHDOG=1, restarted when they stop
        wd = sup.wait_state("wd", "RUNNING")
        p1_holds(lambda: sup.svc("wd")["pid"] == wd["pid"], 1.5, "wd pinging")
        os.unlink(sup.path("wd.ping"))
        new = sup.wait_pid_change("wd", wd["pid"])
        write_text(sup.path("wd.ping"), "")
        sup.wait_log("wd: restarting: watchdog: no WATCHDOG=1 for 1s")
        self.assertIn("watchdog", sup.svc("wd")["reason"] or "")
        self.assertEqual(sup.wait_state("wd", "RUNNING")["pid"], new["pid"])
        self.assertEqual(sup.terminate(), 0)


class TestReadinessAcrossReexec(ReadinessCase):
    def test_readiness_notify_and_health_survive_a_reexec(self):
        port, port2 = free_port(), free_port()
        sup = self.sup("""
            [program:a]
            command = {py} {dir}/notify.py a {dir}
            ready = notify
            ready_timeout = 60

            [program:b]
            command = sleep 1000
            requires = a
            startsecs = 0

            [program:web]
            command = {py} {dir}/serve.py %d {dir} web --wait-bind
            ready = tcp:127.0.0.1:%d
            ready_timeout = 60

            [program:hc]
            command = {py} {dir}/serve.py %d {dir} hc
            ready = tcp:127.0.0.1:%d
            healthcheck = tcp:127.0.0.1:%d
            healthcheck_interval = 0.2
            healthcheck_failures = 2

            [program:wd]
            command = {py} {dir}/notify.py wd {dir} --ready-now --ping
            ready = notify
            watchdog = 1

            [program:slow]
            command = {py} {dir}/notify.py slow {dir}
            ready = notify
            ready_timeout = 4
            startretries = 0
            autostart = false

            [program:silent]
            command = {py} {dir}/notify.py silent {dir} --ready-now --ping
            ready = notify
            watchdog = 4
        """ % (port, port, port2, port2, port2), copy_script=True)
        write_text(sup.path("wd.ping"), "")
        write_text(sup.path("silent.ping"), "")
        sup.start()
        sup.wait_state("a", "STARTING")
        notify(sup, "a", "STATUS=booting")
        wait_for(lambda: sup.svc("a")["status"] == "booting", what="a's STATUS")
        sup.wait_state("web", "STARTING")
        sup.wait_state("hc", "RUNNING")
        sup.wait_state("wd", "RUNNING")
        self.assertEqual(sup.svc("b")["reason"], "waiting for a")
        sup.wait_state("silent", "RUNNING")
        # slow starts (and its ready_timeout begins) just before the exec: `start` without
        # waiting for the answer, which would come only once slow has failed
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as c:
            c.connect(sup.sock)
            c.sendall(b'{"v": 1, "cmd": "start", "args": {"names": ["slow"]}}\n')
            sup.wait_state("slow", "STARTING")
        before = {s["name"]: s for s in sup.status()["services"]}
        # silent stops its WATCHDOG=1 just before the exec: only the carried deadline can fire
        os.unlink(sup.path("silent.ping"))
        sup.proc.send_signal(signal.SIGUSR2)
        wait_for(lambda: sup.status()["supervisor"]["reexecs"] == 1, what="the re-exec")
        after = {s["name"]: s for s in sup.status()["services"]}
        for name in ("a", "web", "hc", "wd", "slow", "silent"):
            self.assertEqual((after[name]["pid"], after[name]["state"]),
                             (before[name]["pid"], before[name]["state"]), name)
        self.assertEqual(after["a"]["status"], "booting")
        self.assertEqual((after["b"]["state"], after["b"]["reason"]), ("STOPPED", "waiting for a"))
        # the notify socket still reaches the new image: READY=1 after the exec
        notify(sup, "a", "READY=1")
        self.assertEqual(sup.wait_state("a", "RUNNING")["pid"], before["a"]["pid"])
        sup.wait_state("b", "RUNNING")
        # the tcp readiness probe is re-armed
        drop(sup, "web", "bind")
        self.assertEqual(sup.wait_state("web", "RUNNING")["pid"], before["web"]["pid"])
        # the health timer is re-armed
        drop(sup, "hc", "close")
        sup.wait_pid_change("hc", before["hc"]["pid"])
        sup.wait_log("hc: restarting: healthcheck failed 2 times")
        # the watchdog still counts WATCHDOG=1 and still fires
        p1_holds(lambda: sup.svc("wd")["pid"] == before["wd"]["pid"], 1.5, "wd pinging after the re-exec")
        os.unlink(sup.path("wd.ping"))
        sup.wait_pid_change("wd", before["wd"]["pid"])
        write_text(sup.path("wd.ping"), "")
        sup.wait_log("wd: restarting: watchdog: no WATCHDOG=1 for 1s")
        # ready_timeout counted from the original start, across the exec
        self.assertIn("not ready within 4s", sup.wait_state("slow", "FATAL")["reason"])
        sup.wait_pid_change("silent", before["silent"]["pid"])
        log = sup.stderr()
        self.assertLess(log.index("re-executed: version"),
                        log.index("silent: restarting: watchdog: no WATCHDOG=1 for 4s"))
        self.assertEqual(sup.terminate(), 0)


    def test_client_connected_before_a_reexec_is_answered_after_it(self):
        # found through PID 1's USR2: a `status` accepted by the old image whose request
        # had not been read in full was dropped by the exec (research risk 15)
        sup = self.sup("""
            [program:idle]
            command = sleep 1000
            startsecs = 0
        """, copy_script=True)
        sup.start()
        early = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.addCleanup(early.close)
        early.settimeout(DEADLINE)
        early.connect(sup.sock)
        early.sendall(b'{"v": 1, "cmd": "sta')
        # a later client answered means the earlier one was accepted (the backlog is FIFO)
        sup.status()
        p = sup.ctl("reexec")
        self.assertEqual(p.returncode, 0, p.stdout + p.stderr)
        early.sendall(b'tus", "args": {}}\n')
        data = b""
        while not data.endswith(b"\n"):
            chunk = early.recv(65536)
            if not chunk:
                break
            data += chunk
        reply = json.loads(data.decode())
        self.assertEqual(reply["supervisor"]["reexecs"], 1)
        self.assertEqual([s["name"] for s in reply["services"]], ["idle"])
        self.assertEqual(sup.terminate(), 0)


class TestLastExitStatus(unittest.TestCase):
    """status keeps a service's last exit code after it was restarted (SPEC: exitstatus)."""

    def test_exitstatus_survives_the_restart(self):
        sup = Sup(self, """
            [respawn]
            watch_self = false
            [program:victim]
            command = sleep 1000
            startsecs = 0
            """).start()
        first = sup.wait_state("victim", "RUNNING")
        self.assertIsNone(first["exitstatus"])
        os.kill(first["pid"], signal.SIGKILL)
        again = sup.wait_pid_change("victim", first["pid"])
        self.assertEqual(again["exitstatus"], -signal.SIGKILL)
        self.assertEqual(again["restarts"], 1)



# ---------------------------------------------------------------------------
# Issue 10: the lifecycle through step(): unplanned restarts end to end, and an
# upgrade of a running supervisor from the released 1.0.0 file
# ---------------------------------------------------------------------------

RELEASED = os.path.join(HERE, ".ci", "data", "respawn-1.0.0.py")   # git show v1.0.0-landed:respawn.py


class TestUnplannedRestarts(unittest.TestCase):
    """SPEC's unplanned restarts, one smoke test each through a real supervisor
    (the policy's every case is in TestCorePolicy)."""

    def test_a_failing_healthcheck_backs_off_in_backoff_and_status_exits_3(self):
        sup = Sup(self, """
            [respawn]
            watch_self = false
            [program:sick]
            command = sleep 1000
            startsecs = 0
            healthcheck = exec:false
            healthcheck_interval = 0.2
            healthcheck_failures = 2
            backoff = 30
            backoff_max = 30
            """).start()
        first = sup.wait_state("sick", "RUNNING")["pid"]
        second = sup.wait_pid_change("sick", first)["pid"]       # the first: immediate
        sup.wait_log("sick: restarting: healthcheck failed 2 times")
        st = sup.wait_state("sick", "BACKOFF")                    # the next: backs off
        wait_for(lambda: not pid_alive(second), what="the second process to be stopped")
        self.assertGreater(st["retry_in"], 5.0)
        self.assertIn("healthcheck failed 2 times", st["reason"])
        p = sup.ctl("status")
        self.assertEqual(p.returncode, 3, p.stdout)
        self.assertIn("BACKOFF", p.stdout)
        sup.wait_log("unplanned restart 1 within 60s, restarting in")
        self.assertEqual(sup.svc("sick")["restarts"], 1)
        self.assertNotIn("FATAL", sup.stderr())
        self.assertEqual(sup.terminate(), 0)

    def test_backoff_reset_zero_keeps_every_restart_immediate(self):
        sup = Sup(self, """
            [respawn]
            watch_self = false
            [program:crashy]
            command = sleep 1000
            startsecs = 0
            backoff = 30
            backoff_reset = 0
            """).start()
        pid = sup.wait_state("crashy", "RUNNING")["pid"]
        for _ in range(3):
            os.kill(pid, signal.SIGKILL)
            pid = sup.wait_pid_change("crashy", pid, timeout=10)["pid"]
        self.assertEqual(sup.svc("crashy")["restarts"], 3)
        self.assertNotIn("unplanned restart", sup.stderr())
        self.assertEqual(sup.terminate(), 0)

    def test_backoff_reset_is_checked_as_a_duration(self):
        code, out, path = run_check(self, """
            [program:a]
            command = sleep 1
            backoff_reset = 2m
            [program:b]
            command = sleep 1
            backoff_reset = soon
            """)
        self.assertEqual(code, 2, out)
        problems = [l for l in out.splitlines() if "backoff_reset" in l]
        self.assertEqual(len(problems), 1, out)
        self.assertIn("c.ini:7", problems[0])                     # b's line, not a's
        ok, out, path = run_check(self, "[program:a]\ncommand = sleep 1\nbackoff_reset = 1m\n")
        self.assertEqual(ok, 0, out)
        self.assertEqual(respawn.load_config(path).programs["a"].backoff_reset, 60.0)
        _, _, path = run_check(self, "[program:a]\ncommand = sleep 1\n")
        self.assertEqual(respawn.load_config(path).programs["a"].backoff_reset, 60.0)    # the default


UPGRADE_CONFIG = """
[program:ticker]
command = {py} -u {dir}/ticker.py
startsecs = 0.2
stopwaitsecs = 2
[program:failing]
command = sh -c "exit 3"
startsecs = 0.5
backoff = 6
backoff_max = 6
startretries = 5
[program:slowstart]
command = sleep 1006
startsecs = 4
[program:gate]
command = sleep 1007
autostart = false
ready = exec:test -e {dir}/gate.open
ready_timeout = 60
"""


class TestUpgradeFromRelease(ReexecCase):
    """A supervisor running the released 1.0.0 file re-executes into this one
    (handoff format 1 read by the new code): services, pipes, timers and
    waiting clients are kept."""

    def test_upgrade_from_1_0_0_keeps_everything(self):
        self.assertTrue(os.path.exists(RELEASED), RELEASED)
        with open(RELEASED) as f:
            self.assertIn('__version__ = "1.0.0"', f.read())
        sup = Sup(self, UPGRADE_CONFIG, script=RELEASED, copy_script=True)
        write_ticker(sup)
        sup.start()
        sup.wait_state("ticker", "RUNNING")
        sup.wait_state("failing", "BACKOFF")
        sup.wait_state("slowstart", "STARTING")
        # a client waiting for `start gate` (ready only once gate.open exists)
        waiting = subprocess.Popen([PY, sup.script, "-c", sup.config, "start", "gate"],
                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                   env=sup.env)
        self.addCleanup(lambda: waiting.poll() is None and waiting.kill())
        gate = sup.wait_state("gate", "STARTING")["pid"]
        before = self.pids(sup)
        self.assertEqual(self.status(sup)["supervisor"]["version"], "1.0.0")
        new = with_version(read_text(SCRIPT), "1.1.0-upgrade")
        install_by_rename(sup.script, new)
        st = self.wait_reexecs(sup, 1, "1.1.0-upgrade")
        self.assertIn("re-executed: version 1.0.0", rx_log_lines(sup, "re-executed: version")[-1])
        self.assertEqual(self.pids(sup), before)
        states = {s["name"]: s["state"] for s in st["services"]}
        self.assertEqual(states["ticker"], "RUNNING")
        self.assertEqual(states["gate"], "STARTING")
        self.assertIsNone(waiting.poll(), "the waiting client was answered before its service was ready")
        # the waiting client is answered by the new image once gate is ready
        with open(sup.path("gate.open"), "w"):
            pass
        out, err = waiting.communicate(timeout=DEADLINE)
        self.assertEqual(waiting.returncode, 0, out + err)
        self.assertIn("gate: RUNNING", out)
        self.assertEqual(sup.svc("gate")["pid"], gate)
        # timers carried: startsecs from the original start, the backoff from the old decision
        sup.wait_state("slowstart", "RUNNING")
        self.assertEqual(sup.svc("slowstart")["pid"], before["slowstart"])
        wait_for(lambda: len(rx_log_lines(sup, "failing: started pid")) >= 2, what="failing's retry")
        line = rx_log_lines(sup, "failing: exit 3: failed start 1, retrying in")[0]
        delay = float(re.search(r"retrying in ([\d.]+)s", line).group(1))
        lines = sup.stderr().splitlines()
        i = next(n for n, l in enumerate(lines) if "failing: exit 3: failed start 1" in l)
        j = next(n for n in range(i + 1, len(lines)) if "failing: started pid" in lines[n])
        self.assertGreaterEqual(log_time(lines[j]) - log_time(lines[i]), delay - 0.01)
        # the pipes carried: the ticker's lines go on with none lost
        seen = wait_for(lambda: (lambda n: n if len(n) > 5 and n[-1] > n[0] + 40 else None)(
            numbers([l.split(" | ", 1)[1] for l in sup.stdout().splitlines() if l.startswith("ticker | ")])),
            what="ticker lines after the upgrade")
        self.assertEqual(seen, list(range(seen[0], seen[0] + len(seen))))
        # and the new policy runs the services: a kill is restarted
        os.kill(before["ticker"], signal.SIGKILL)
        sup.wait_pid_change("ticker", before["ticker"])
        self.assertEqual(zombies_of(sup.proc.pid), [])
        self.assertEqual(sup.terminate(), 0)
        self.assert_all_gone(sup, {n: p for n, p in before.items() if p})

    def test_a_downgrade_to_1_0_0_is_refused_with_nothing_lost(self):
        # 1.0.0 cannot read handoff format 2: its trial refuses it, this code goes on
        sup = self.sup(SLEEPERS)
        sup.start()
        sup.wait_state("a", "RUNNING")
        sup.wait_state("b", "RUNNING")
        before = self.pids(sup)
        version = self.status(sup)["supervisor"]["version"]
        install_by_rename(sup.script, read_text(RELEASED))
        sup.wait_log("re-exec refused: the new code rejects the config or fails to start")
        self.assertIn("the new code cannot restore the running state", rx_log_lines(sup, "re-exec refused")[0])
        self.assertEqual(rx_log_lines(sup, "INFO  re-executing"), [])
        st = self.status(sup)
        self.assertEqual(st["supervisor"]["version"], version)
        self.assertEqual(self.pids(sup), before)
        os.kill(before["a"], signal.SIGKILL)          # and it still supervises
        sup.wait_pid_change("a", before["a"])


# ---------------------------------------------------------------------------
# Issue 14, the client: errors on stderr and as JSON, the status --json
# schema, the restarts column, log --stderr, one command's help, wording, the
# supervisor's process title
# ---------------------------------------------------------------------------

CLIENT_CONFIG = """
[respawn]
watch_self = false

[program:both]
command = sh -c 'i=0; while :; do i=$((i+1)); echo "out $i"; echo "err $i" >&2; sleep 0.05; done'
startsecs = 0
stopwaitsecs = 2

[program:errfile]
command = sh -c 'echo "out once"; i=0; while :; do i=$((i+1)); echo "err $i" >&2; sleep 0.05; done'
stderr_logfile = {dir}/errfile.err
startsecs = 0
stopwaitsecs = 2

[program:merged]
command = sh -c 'echo "out m"; echo "err m" >&2; exec sleep 1000'
redirect_stderr = true
stdout_logfile = {dir}/merged.log
startsecs = 0
stopwaitsecs = 2

[program:mute]
command = sh -c 'echo "out z"; echo "err z" >&2; exec sleep 1000'
stdout_logfile = none
stderr_logfile = {dir}/mute.err
startsecs = 0
stopwaitsecs = 2

[program:dropped]
command = sh -c 'echo "err d" >&2; exec sleep 1000'
stderr_logfile = none
startsecs = 0
stopwaitsecs = 2

[program:manual]
command = sleep 1000
autostart = false
"""


def client_run(args, env=None, cwd=None, script=SCRIPT):
    return subprocess.run(respawn_argv(script, args), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          text=True, timeout=60, env=env, cwd=cwd)


class FakeSupervisor:
    """A Unix socket that answers each connection with `reply` (bytes, or None:
    close without a word), in a thread: the client's side of a broken peer."""

    def __init__(self, test, reply):
        self.dir = tempfile.mkdtemp(prefix="respawn-fake-")
        test.addCleanup(shutil.rmtree, self.dir, True)
        self.path = os.path.join(self.dir, "fake.sock")
        self.config = os.path.join(self.dir, "fake.ini")
        write_file(self.config, "[respawn]\nsocket = %s\n[program:x]\ncommand = sleep 1\n" % self.path)
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.bind(self.path)
        self.sock.listen(8)
        self.reply, self.held = reply, []
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()
        test.addCleanup(self.close)

    def _serve(self):
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            conn.recv(65536)
            if self.reply == b"hold":
                self.held.append(conn)        # never answers
                continue
            if self.reply:
                conn.sendall(self.reply)
            conn.close()

    def close(self):
        for conn in self.held:
            conn.close()
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.sock.close()


class TestClientErrors(unittest.TestCase):
    """Every error of a client on stderr; with --json, {"error": ...} on stdout too."""

    def assert_error(self, p, says, code=1, as_json=False):
        self.assertEqual(p.returncode, code, (p.stdout, p.stderr))
        self.assertEqual(len(p.stderr.splitlines()), 1, p.stderr)
        self.assertIn(says, p.stderr)
        self.assertNotIn("Traceback", p.stderr)
        if as_json:
            self.assertEqual(json.loads(p.stdout), {"error": p.stderr.strip()})
        else:
            self.assertEqual(p.stdout, "")

    def test_a_running_supervisor_refusing_a_request(self):
        sup = Sup(self, CLIENT_CONFIG).start()
        sup.wait_state("both", "RUNNING")
        for args, says in ((("status", "nope"), "no such service: nope"),
                           (("start", "nope"), "no such service: nope"),
                           (("stop", "both", "nope"), "no such service: nope"),
                           (("signal", "HUP", "manual"), "not running: manual"),
                           (("signal", "BOGUS", "both"), "unknown signal"),
                           (("log", "nope"), "no such service: nope"),
                           (("log", "nope", "--stderr"), "no such service: nope")):
            with self.subTest(args=args):
                self.assert_error(sup.ctl(*args), says)
        self.assert_error(sup.ctl("status", "--json", "nope"), "no such service: nope", as_json=True)
        self.assertEqual(sup.svc("both")["state"], "RUNNING")      # nothing was done
        # a service that fails its start: the others' lines on stdout, its own on stderr
        sup.write_config(CLIENT_CONFIG + "\n[program:broken]\ncommand = sh -c 'exit 1'\n"
                         "autostart = false\nstartsecs = 1\nstartretries = 0\n")
        self.assertEqual(sup.ctl("reload").stdout, "added: broken\n")
        p = sup.ctl("start", "manual", "broken")
        self.assertEqual((p.returncode, p.stdout), (1, "manual: RUNNING\n"), p.stderr)
        self.assertEqual(p.stderr, "broken: ERROR (FATAL: exit 1; gave up after 1 failed start)\n")
        # a rejected reload: every line on stderr, nothing on stdout
        sup.write_config(CLIENT_CONFIG + "\n[program:bad]\ncommand = sleep 1\nstartsecs = soon\n")
        p = sup.ctl("reload")
        self.assertEqual((p.returncode, p.stdout), (1, ""))
        self.assertIn("config rejected", p.stderr)
        self.assertIn("startsecs", p.stderr)
        self.assertEqual(sup.terminate(), 0)

    def test_broken_peers_no_config_and_usage_mistakes(self):
        for reply, says in ((None, "the supervisor closed the connection without answering"),
                            (b"<html>hello</html>\n", "the supervisor's answer is not JSON"),
                            (b'{"ok": false, "error": "permission denied: uid 1234 is neither root '
                             b'nor the supervisor\'s user"}\n', "permission denied: uid 1234")):
            fake = FakeSupervisor(self, reply)
            for args in (("status",), ("status", "--json"), ("stop", "x"), ("reload",)):
                with self.subTest(reply=reply, args=args):
                    self.assert_error(client_run(["-c", fake.config] + list(args)), says,
                                      as_json="--json" in args)
        # a socket path longer than AF_UNIX allows: one line, not a traceback
        d = tempfile.mkdtemp(prefix="respawn-long-")
        self.addCleanup(shutil.rmtree, d, True)
        config = os.path.join(d, "c.ini")
        write_file(config, "[respawn]\nsocket = /tmp/%s.sock\n[program:x]\ncommand = sleep 1\n" % ("x" * 200))
        for args in (("status",), ("status", "--json")):
            p = client_run(["-c", config] + list(args))
            # (or, if the config check refuses such a path, nothing answers on the default)
            self.assertRegex(p.stderr, r"^(cannot talk to the supervisor on /tmp/xxx|no supervisor is running)")
            self.assert_error(p, "", as_json="--json" in args)
        # usage mistakes: exit 2, and with --json an error object as well
        self.assert_error(client_run(["status", "--json", "--bogus"]), "unknown option --bogus", 2,
                          as_json=True)
        self.assert_error(client_run(["stat"]), "unknown command 'stat' (did you mean 'status'?)", 2)

    def test_a_supervisor_that_never_answers_times_out_with_one_line(self):
        # in-process, with the client's 30 s deadline shortened
        import contextlib
        import io
        fake = FakeSupervisor(self, b"hold")
        real = respawn._send_request

        def hurried(path, cmd, args, timeout):
            return real(path, cmd, args, timeout=0.3)
        respawn._send_request = hurried
        self.addCleanup(setattr, respawn, "_send_request", real)
        out, err = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = respawn.main(["-c", fake.config, "status", "--json"])
        self.assertEqual(code, 1)
        self.assertEqual(err.getvalue(), "the supervisor did not answer in time (it may be stopped or "
                                         "overloaded)\n")
        self.assertEqual(json.loads(out.getvalue()), {"error": err.getvalue().strip()})
        # a connection reset before any answer: one line as well

        def reset(path, cmd, args=None, timeout=None):
            raise ConnectionResetError(errno.ECONNRESET, os.strerror(errno.ECONNRESET))
        real_whole = respawn.request_whole
        respawn.request_whole = reset
        self.addCleanup(setattr, respawn, "request_whole", real_whole)
        out, err = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = respawn.main(["-c", fake.config, "status", "--json"])
        self.assertEqual(code, 1)
        self.assertEqual(err.getvalue(), "cannot talk to the supervisor on %s: %s\n"
                         % (fake.path, os.strerror(errno.ECONNRESET)))
        self.assertEqual(json.loads(out.getvalue()), {"error": err.getvalue().strip()})

    def test_no_config_found_names_the_four_places(self):
        if os.path.exists("/etc/respawn.ini"):
            self.skipTest("/etc/respawn.ini exists on this machine: a config would be found")
        d = tempfile.mkdtemp(prefix="respawn-noconf-")
        self.addCleanup(shutil.rmtree, d, True)
        os.mkdir(os.path.join(d, "bin"))
        script = os.path.join(d, "bin", "respawn.py")
        shutil.copy(SCRIPT, script)                   # no respawn.ini beside it
        env = dict(os.environ)
        env.pop("RESPAWN_CONFIG", None)
        says = ("no config file found: looked for $RESPAWN_CONFIG (not set), ./respawn.ini (in %s), "
                "%s (beside the script) and /etc/respawn.ini; name one with -c FILE"
                % (d, os.path.join(d, "bin", "respawn.ini")))
        for args, code in ((["run"], 2), (["check"], 2), (["status"], 1), (["stop", "all"], 1)):
            with self.subTest(args=args):
                p = client_run(args, env=env, cwd=d, script=script)
                self.assertEqual((p.returncode, p.stdout, p.stderr), (code, "", says + "\n"))
        p = client_run(["status", "--json"], env=env, cwd=d, script=script)
        self.assertEqual((p.returncode, json.loads(p.stdout), p.stderr), (1, {"error": says}, says + "\n"))
        env["RESPAWN_CONFIG"] = os.path.join(d, "gone.ini")
        p = client_run(["check"], env=env, cwd=d, script=script)
        self.assertIn("$RESPAWN_CONFIG (%s)" % env["RESPAWN_CONFIG"], p.stderr)
        self.assertEqual(p.returncode, 2)


def client_in_process(args, env=None, cwd=None):
    """respawn.main(args) in this process: (exit code, stdout, stderr).  env: the
    variables to set for the call (None: unset), cwd: where it runs."""
    import contextlib
    import io
    saved, here = dict(os.environ), os.getcwd()
    out, err = io.StringIO(), io.StringIO()
    try:
        for key, value in (env or {}).items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        if cwd:
            os.chdir(cwd)
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = respawn.main(list(args))
    finally:
        os.chdir(here)
        os.environ.clear()
        os.environ.update(saved)
    return code, out.getvalue(), err.getvalue()


# a client whose config reader fails the command: what it reaches, it reached
# without reading the program sections
TRAPPED_CLIENT = (
    "import importlib.util, sys\n"
    "spec = importlib.util.spec_from_file_location('respawn', sys.argv[1])\n"
    "m = importlib.util.module_from_spec(spec)\n"
    "spec.loader.exec_module(m)\n"
    "def trap(*args, **kw):\n"
    "    sys.exit('the client read the whole config')\n"
    "m.load_config = trap\n"
    "sys.exit(m.main(sys.argv[2:]))\n")

FAKE_STATUS = {"ok": True, "supervisor": {"pid": 4242, "version": "9.9.9", "started": 1.5, "reexecs": 0,
                                          "config": "/x.ini"},
               "services": [{"name": "x", "state": "RUNNING", "pid": 4343, "started": 1.5, "uptime": 2.0,
                             "restarts": 0, "exitstatus": None, "reason": None, "ready": True, "ok": True}]}


class TestClientFindsTheSocket(unittest.TestCase):
    """Issue 15: a client finds the running supervisor through its lock file (where
    it listens, written at its start), without reading the config's program
    sections (5000 of them took 300 ms per command); with none running it reads
    [respawn] alone, and a file of another shape in full, as before."""

    def setUp(self):
        self.dir = tempfile.mkdtemp(prefix="respawn-find-")
        self.addCleanup(shutil.rmtree, self.dir, True)
        real = respawn.load_config
        self.full_reads = []

        def counted(*args, **kw):
            self.full_reads.append(args[0])
            return real(*args, **kw)
        respawn.load_config = counted
        self.addCleanup(setattr, respawn, "load_config", real)

    def config(self, *parts, name="c.ini"):
        path = os.path.join(self.dir, name)
        write_file(path, "".join(textwrap.dedent(p).lstrip() for p in parts).replace("{dir}", self.dir))
        return path

    def programs(self, n=50):
        return "".join("[program:p%d]\ncommand = sleep 1\nstartsecs = 0\n\n" % i for i in range(n))

    def hold_lock(self, config, sock, pid=None):
        """The lock file a supervisor of config writes at its start (it listens on sock)."""
        path = respawn.lock_path(config)
        respawn.make_private_dir(os.path.dirname(path), private=True)
        write_file(path, "%d\n%s\n" % (pid or os.getpid(), sock))
        self.addCleanup(lambda: os.path.exists(path) and os.unlink(path))

    def test_the_lock_leads_to_the_supervisor_in_every_environment(self):
        fake = FakeSupervisor(self, (json.dumps(FAKE_STATUS) + "\n").encode())
        # the file says another socket now (an edit not reloaded) and cannot be read
        # in full (a mistake in a program section): the lock alone leads there
        config = self.config("""
            [respawn]
            socket = {dir}/edited.sock
            [program:x]
            command = sleep 1
            startsecs = soon
            """, self.programs())
        self.hold_lock(config, fake.path)
        os.mkdir(os.path.join(self.dir, "xdg"), 0o700)
        os.mkdir(os.path.join(self.dir, "elsewhere"))
        os.symlink(self.dir, os.path.join(self.dir, "link"))
        cases = (("a login's XDG_RUNTIME_DIR", config, {"XDG_RUNTIME_DIR": os.path.join(self.dir, "xdg")}, None),
                 ("cron, systemd: none", config, {"XDG_RUNTIME_DIR": None}, None),
                 ("a symlinked path", os.path.join(self.dir, "link", "c.ini"), {}, None),
                 ("another cwd, a relative path", "../c.ini", {}, os.path.join(self.dir, "elsewhere")),
                 ("sudo -E: root with the user's XDG_RUNTIME_DIR and HOME",
                  config, {"XDG_RUNTIME_DIR": "/run/user/1000", "HOME": "/home/someone"}, "/"))
        for what, path, env, cwd in cases:
            with self.subTest(what):
                code, out, err = client_in_process(["-c", path, "status", "--json"], env, cwd)
                self.assertEqual((code, err), (0, ""))
                self.assertEqual(json.loads(out)["supervisor"]["pid"], 4242)
                self.assertEqual(self.full_reads, [])
        # a real supervisor, as root and as nobody, in each environment: see
        # IdentityCases.test_one_supervisor_whatever_the_environment (TRAPPED_CLIENT)

    def test_no_supervisor_names_the_socket_of_respawn_section_without_a_full_read(self):
        sock = os.path.join(self.dir, "s.sock")
        plain = self.config("""
            [respawn]
            socket = %(here)s/s.sock   ; beside the config
            loglevel = info
            """, self.programs())
        # a mistake in a program section, or a line that `check` cannot read at all
        typo = self.config(read_text(plain), "[program:bad]\ncommand = sleep 1\nstartsecs = soon\n",
                           name="typo.ini")
        junk = self.config(read_text(plain), "this is not a key\n", name="junk.ini")
        # none at all: the default socket (XDG_RUNTIME_DIR unset, as root: /run/respawn)
        bare = self.config(self.programs(), name="bare.ini")
        for path, named in ((plain, sock), (typo, os.path.join(self.dir, "s.sock")),
                            (junk, os.path.join(self.dir, "s.sock")),
                            (bare, None)):
            with self.subTest(os.path.basename(path)):
                named = named or respawn.default_socket(path)
                says = "no supervisor is running (nothing answers on %s)" % named
                code, out, err = client_in_process(["-c", path, "status"], {"XDG_RUNTIME_DIR": None})
                self.assertEqual((code, out, err), (1, "", says + "\n"))
                code, out, err = client_in_process(["-c", path, "status", "--json"], {"XDG_RUNTIME_DIR": None})
                self.assertEqual((code, json.loads(out), err), (1, {"error": says}, says + "\n"))
                self.assertEqual(self.full_reads, [])
        # a lock left by a supervisor that died (its PID gone): as if none
        child = subprocess.Popen(["true"])
        child.wait()
        self.hold_lock(plain, os.path.join(self.dir, "gone.sock"), pid=child.pid)
        self.assertEqual(client_in_process(["-c", plain, "status"])[2],
                         "no supervisor is running (nothing answers on %s)\n" % sock)
        self.assertEqual(self.full_reads, [])

    def test_a_file_of_another_shape_is_read_in_full(self):
        more = self.config("""
            [respawn]
            socket = {dir}/included.sock
            """, name="more.ini")
        cases = (
            ("[respawn] in an included file",
             "[include]\nfiles = more.ini\n" + self.programs(), "included.sock"),
            ("[respawn] indented (it could be a line of a value)",
             self.programs(2) + "  [respawn]\n  socket = {dir}/indented.sock\n", "indented.sock"),
            ("two [respawn] sections (an error: the first one's)",
             "[respawn]\nsocket = {dir}/one.sock\n[respawn]\nsocket = {dir}/two.sock\n", "one.sock"),
            ("a line after it that begins with [ and is a key",
             "[respawn]\nlogfile = {dir}/x.log\n[odd = 1\nsocket = {dir}/after.sock\n", "after.sock"),
        )
        for what, text, named in cases:
            with self.subTest(what):
                path = self.config(text, name="shape.ini")
                del self.full_reads[:]
                named = os.path.join(self.dir, named) if named else respawn.default_socket(path)
                self.assertEqual(respawn.client_socket(path), named)
                self.assertEqual(self.full_reads, [path])
        self.assertTrue(os.path.exists(more))

    def test_the_respawn_section_alone_reads_as_the_whole_file(self):
        """config_socket against load_config's socket, on the config texts of these
        tests and of the supervisord corpus, each also with a [respawn] section put
        before, after, or in the middle of it (and stray lines)."""
        texts = [read_text(os.path.join(HERE, "respawn.ini"))]
        corpus = os.path.join(HERE, ".ci", "data", "supervisord")
        for name in sorted(os.listdir(corpus)) if os.path.isdir(corpus) else ():
            try:
                texts.append(read_text(os.path.join(corpus, name)))
            except (UnicodeDecodeError, IsADirectoryError):
                pass
        texts += [textwrap.dedent(m.group(1)).lstrip()
                  for m in re.finditer(r'"""(.*?)"""', read_text(os.path.abspath(__file__)), re.S)
                  if "[program:" in m.group(1) or "[supervisord]" in m.group(1)]
        os.environ["RESPAWN_TEST_SOCKDIR"] = self.dir
        self.addCleanup(os.environ.pop, "RESPAWN_TEST_SOCKDIR", None)
        rng = random.Random(15)
        strays = ["[respawn]", "socket = /q.sock", "[odd = 1", "[x", "  [respawn]", "", "; c", "# c",
                  "[respawn]]", "\tsocket=/t.sock", "[include]\nfiles = none*.ini", "\r"]
        fast = 0
        for n, text in enumerate(texts):
            lines = text.split("\n")
            variants = [text, "[respawn]\nsocket = %(here)s/a.sock\n" + text,
                        text + "\n[respawn]\nsocket = %(ENV_RESPAWN_TEST_SOCKDIR)s/b.sock ; c\n  more\n"
                               "[program:zz]\ncommand = x\n"]
            for _ in range(3):
                at = rng.randrange(len(lines) + 1)
                variants.append("\n".join(lines[:at] + [rng.choice(strays)] + lines[at:]))
            for k, variant in enumerate(variants):
                path = os.path.join(self.dir, "v%d-%d.ini" % (n, k))
                with open(path, "w", newline="") as f:
                    f.write(variant)
                loader = respawn._Loader(respawn._read_text)
                loader.load(path)
                if not loader.sections:
                    continue      # a file `check` drops whole: the one difference (config_socket)
                try:
                    expected = respawn.load_config(path).settings["socket"]
                except respawn.ConfigErrors as exc:
                    expected = exc.settings.get("socket")
                fast += respawn._respawn_section_socket(path) is not False
                self.assertEqual(respawn.config_socket(path), expected, variant[:2000])
        self.assertGreater(fast, 100)          # most took the short way


def readme_schema_keys():
    """The `status --json` keys the README documents: its `| `supervisor.K` |`
    and `| `services[].K` |` table rows."""
    text = read_text(os.path.join(HERE, "README.md"))
    return (set(re.findall(r"^\| `supervisor\.(\w+)` \|", text, re.M)),
            set(re.findall(r"^\| `services\[\]\.(\w+)` \|", text, re.M)),
            set(re.findall(r"^\| `(\w+)` \| (?:top level)", text, re.M)))


class TestStatusSchema(unittest.TestCase):
    def test_schema_version_first_and_every_key_documented(self):
        sup = Sup(self, CLIENT_CONFIG).start()
        sup.wait_state("both", "RUNNING")
        p = sup.ctl("status", "--json")
        self.assertEqual(p.returncode, 0, p.stderr)
        doc = json.loads(p.stdout)
        self.assertEqual(list(doc)[0], "schema")
        self.assertEqual(doc["schema"], respawn.STATUS_SCHEMA)
        self.assertEqual(respawn.STATUS_SCHEMA, 1)
        self.assertNotIn("ok", doc)                          # the protocol's own flag stays inside
        documented_sup, documented_svc, top = readme_schema_keys()
        self.assertEqual(top, {"schema", "supervisor", "services", "error"})
        self.assertEqual(set(doc) - top, set(), "an undocumented top-level key")
        self.assertEqual(set(doc["supervisor"]) - documented_sup, set(), "undocumented supervisor keys")
        for s in doc["services"]:
            self.assertEqual(set(s) - documented_svc, set(), "undocumented service keys")
        # SPEC's keys are all there (never removed)
        self.assertTrue({"pid", "version", "started", "reexecs", "config"} <= set(doc["supervisor"]))
        self.assertTrue({"name", "state", "pid", "started", "uptime", "restarts", "exitstatus",
                         "reason", "ready"} <= set(doc["services"][0]))
        self.assertEqual(sup.terminate(), 0)

    def test_restarts_column_counts_what_the_json_counts(self):
        sup = Sup(self, """
            [respawn]
            watch_self = false
            [program:victim]
            command = sleep 1000
            startsecs = 0
            [program:calm]
            command = sleep 1000
            startsecs = 0
            """).start()
        pid = sup.wait_state("victim", "RUNNING")["pid"]
        sup.wait_state("calm", "RUNNING")
        for _ in range(2):
            os.kill(pid, signal.SIGKILL)
            pid = sup.wait_pid_change("victim", pid)["pid"]
        sup.wait_state("victim", "RUNNING")
        self.assertEqual(sup.svc("victim")["restarts"], 2)
        p = sup.ctl("status")
        self.assertEqual(p.returncode, 0, p.stderr)
        rows = {line.split()[0]: line for line in p.stdout.splitlines()}
        self.assertRegex(rows["victim"], r"^victim  RUNNING   restarts 2  pid %d, uptime " % pid)
        self.assertRegex(rows["calm"], r"^calm    RUNNING   restarts 0  pid \d+, uptime ")
        self.assertEqual(sup.terminate(), 0)


def canonical_status_json(doc):
    """`status --json`'s text for a decoded doc, written here independently of the
    client: the supervisor's keys as by indent=2, each service by json.dumps on a
    line of its own, "services" last."""
    head = dict((k, v) for k, v in doc.items() if k != "services")
    text = json.dumps(head, indent=2)[:-2]
    if doc["services"]:
        services = "[\n    %s\n  ]" % ",\n    ".join(json.dumps(s) for s in doc["services"])
    else:
        services = "[]"
    return (text + ",\n" if head else "{\n") + '  "services": %s\n}' % services


def status_lines(doc):
    """This release's answer to a status request with "lines": a line with the
    rest, then one line per service (serve_status)."""
    head = dict((k, v) for k, v in doc.items() if k != "services")
    head.update(lines=len(doc["services"]), all_ok=all(s["ok"] for s in doc["services"]))
    return "".join(json.dumps(o) + "\n" for o in [head] + doc["services"]).encode()


class TestStatusJsonLayout(unittest.TestCase):
    """Issue 15: `status --json` printed by the C encoder, one service a line (its
    pure-Python indent=2 took 70 ms of the command at 5000 services); and each
    service's line printed as the supervisor sent it, not decoded and encoded again."""

    def tricky_services(self):
        services = [dict(FAKE_STATUS["services"][0], name="s%d" % i, pid=100 + i) for i in range(3)]
        services[1].update(reason='exit 3; "quoted", {braces}, [brackets],\nand a newline', state="FATAL",
                           pid=None, ok=False, waiting_for=["a", "b"], uptime=0.1 + 0.2)
        services[2]["reason"] = "caf\u00e9 \u2603 \U0001f600 \udc80 \x01 / \\"
        return services

    def test_one_key_a_line_one_service_a_line_and_valid_json(self):
        services = self.tricky_services()
        doc = {"schema": 1, "supervisor": FAKE_STATUS["supervisor"], "services": services}
        text = respawn.format_status_json({"schema": 1, "supervisor": doc["supervisor"]},
                                          ",\n    ".join(json.dumps(s) for s in services).encode())
        self.assertTrue(text.endswith(b"}\n"))
        text = text.decode()[:-1]
        self.assertEqual(json.loads(text), doc)
        self.assertEqual(text, canonical_status_json(doc))
        lines = text.split("\n")
        # the supervisor indented as by indent=2, each service on a line
        head = json.dumps({"schema": 1, "supervisor": doc["supervisor"]}, indent=2).split("\n")[:-2]
        self.assertEqual(lines[:len(head) + 1], head + ["  },"])
        rest = lines[len(head) + 1:]
        self.assertEqual(rest[0], '  "services": [')
        for line, svc in zip(rest[1:4], services):
            self.assertTrue(line.startswith('    {"name": '), line)
            self.assertEqual(json.loads(line.rstrip(",")), svc)
        self.assertEqual(rest[4:], ["  ]", "}"])
        self.assertTrue(text.isascii())              # as json.dumps writes it: \u escapes
        # no service: an empty array on the key's line
        empty = respawn.format_status_json({"schema": 1, "supervisor": {"pid": 1}}, b"")
        self.assertEqual(empty, b'{\n  "schema": 1,\n  "supervisor": {\n    "pid": 1\n  },\n  "services": []\n}\n')

    def test_the_command_prints_it_and_exits_by_the_services(self):
        # an older supervisor's one object (1.0.0 answers so: it ignores "lines")
        pinned = ('{\n  "schema": 1,\n  "supervisor": {\n    "pid": 4242,\n    "version": "9.9.9",\n'
                  '    "started": 1.5,\n    "reexecs": 0,\n    "config": "/x.ini"\n  },\n  "services": [\n'
                  '    {"name": "x", "state": "RUNNING", "pid": 4343, "started": 1.5, "uptime": 2.0, '
                  '"restarts": 0, "exitstatus": null, "reason": null, "ready": true, "ok": true}\n  ]\n}\n')
        for services, code in ((FAKE_STATUS["services"], 0),
                               ([dict(FAKE_STATUS["services"][0], state="FATAL", ok=False, pid=None)], 3),
                               (self.tricky_services(), 3), ([], 0)):
            fake = FakeSupervisor(self, (json.dumps(dict(FAKE_STATUS, services=services)) + "\n").encode())
            with self.subTest(code=code, services=len(services)):
                code_, out, err = client_in_process(["-c", fake.config, "status", "--json"])
                self.assertEqual((code_, err), (code, ""))
                doc = json.loads(out)
                self.assertEqual(list(doc), ["schema", "supervisor", "services"])      # no "ok"
                self.assertEqual(doc["services"], services)
                self.assertEqual(out, canonical_status_json(doc) + "\n")
                if services is FAKE_STATUS["services"]:
                    self.assertEqual(out, pinned)

    def test_lines_are_printed_as_sent_and_equal_the_decoded_form(self):
        """The same status as one object (an older supervisor) and as lines (this
        one): the same text, the same table and the same exit code."""
        for services, code in ((FAKE_STATUS["services"], 0), (self.tricky_services(), 3), ([], 0)):
            doc = dict(FAKE_STATUS, services=services)
            old = FakeSupervisor(self, (json.dumps(doc) + "\n").encode())
            new = FakeSupervisor(self, status_lines(doc))
            for args in (["status", "--json"], ["status"], ["status", "--json", "x"]):
                with self.subTest(services=len(services), args=args):
                    was = client_in_process(["-c", old.config] + args)
                    now = client_in_process(["-c", new.config] + args)
                    self.assertEqual(now, was)
                    self.assertEqual(now[0], code)
                    if "--json" in args:
                        self.assertEqual(now[1], canonical_status_json(dict({"schema": 1}, **{
                            k: v for k, v in doc.items() if k != "ok"})) + "\n")
        # each line is printed as it came: the client does not encode it again
        doc = dict(FAKE_STATUS, services=[dict(FAKE_STATUS["services"][0], name="n%d" % i) for i in range(2)])
        answer = status_lines(doc).replace(b'"name": "n1", "state": "RUNNING"', b'"name":"n1","state":"RUNNING"')
        code, out, err = client_in_process(["-c", FakeSupervisor(self, answer).config, "status", "--json"])
        self.assertEqual((code, err), (0, ""))
        self.assertIn('\n    {"name":"n1","state":"RUNNING", "pid"', out)
        self.assertEqual(json.loads(out)["services"], doc["services"])
        # the supervisor's other keys, and a schema it gives, are printed before "services"
        doc = dict(FAKE_STATUS, schema=7, later={"k": [1]})
        code, out, err = client_in_process(["-c", FakeSupervisor(self, status_lines(doc)).config,
                                            "status", "--json"])
        self.assertEqual(list(json.loads(out)), ["schema", "supervisor", "later", "services"])
        self.assertEqual((json.loads(out)["schema"], json.loads(out)["later"]), (7, {"k": [1]}))

    def test_a_reader_that_goes_away_is_exit_1_without_a_word(self):
        # `status --json | head -1`: more than a pipe holds, and the reader gone after a line
        services = [dict(FAKE_STATUS["services"][0], name="s%d" % i) for i in range(3000)]
        for answer in (status_lines(dict(FAKE_STATUS, services=services)),
                       (json.dumps(dict(FAKE_STATUS, services=services)) + "\n").encode()):
            fake = FakeSupervisor(self, answer)
            with self.subTest(form="lines" if b'"lines"' in answer[:200] else "object"):
                proc = subprocess.Popen(respawn_argv(SCRIPT, ["-c", fake.config, "status", "--json"]),
                                        stdout=subprocess.PIPE, stderr=subprocess.PIPE)
                self.addCleanup(lambda p=proc: p.poll() is None and p.kill())
                self.assertEqual(proc.stdout.readline(), b"{\n")
                proc.stdout.close()
                err = proc.stderr.read()
                self.assertEqual((proc.wait(timeout=60), err), (1, b""))
                proc.stderr.close()

    def test_an_answer_cut_short_is_one_line_and_exit_1(self):
        services = [dict(FAKE_STATUS["services"][0], name="s%d" % i) for i in range(3)]
        whole = status_lines(dict(FAKE_STATUS, services=services))
        more = "the supervisor's answer has more than the 3 services it counts"
        short = "the supervisor's answer was cut short (%d of 3 services)"
        for answer, says in ((whole[:whole.rindex(b"\n", 0, -1) + 1], short % 2), (whole[:-1], short % 2),
                             (whole[:whole.index(b"\n") + 1], short % 0),
                             (whole + b'{"name": "more"}\n', more), (whole + b'{"name": "m', more)):
            fake = FakeSupervisor(self, answer)
            for args in (["status"], ["status", "--json"]):
                with self.subTest(says=says, args=args):
                    code, out, err = client_in_process(["-c", fake.config] + args)
                    self.assertEqual(code, 1)
                    self.assertEqual(err, says + "\n")
                    if "--json" in args:
                        self.assertEqual(json.loads(out), {"error": err.strip()})
                    else:
                        self.assertEqual(out, "")

    def test_json_lines_is_each_objects_json_dumps_on_its_line(self):
        services = self.tricky_services()
        services[0]["reason"] = 'ends with }, {"name": "not a service"}'
        for objects, cut in ((services, True), ([{"name": "a"}], True), ([], True),
                             # an object in an object with "name" first: the cut would be wrong
                             ([{"name": "a", "in": [{"x": 1}, {"name": "b"}]}, {"name": "c"}], False),
                             ([{"name": "a"}, {"other": 1}], False)):
            with self.subTest(objects=objects):
                self.assertEqual(respawn.json_lines(objects), "".join(json.dumps(o) + "\n" for o in objects))
                if objects:
                    text = json.dumps(objects)[1:-1]
                    self.assertEqual(text.count('}, {"name": ') == len(objects) - 1, cut)

    def test_a_client_command_does_not_keep_its_source(self):
        # a supervisor compresses its source to keep it (Packed); a client has no use
        # for it, and compressing 370 KB was 11 ms of every command
        packed = []
        real = respawn.Packed

        def recording(data):
            packed.append(len(data))
            return real(data)
        respawn.Packed = recording
        self.addCleanup(setattr, respawn, "Packed", real)
        fake = FakeSupervisor(self, status_lines(FAKE_STATUS))
        self.assertEqual(client_in_process(["-c", fake.config, "status", "--json"])[0], 0)
        self.assertEqual(client_in_process(["-c", fake.config, "check"])[0], 0)
        self.assertEqual(packed, [])

    def up_and_gone(self, header="", **kw):
        """A supervisor of two services, one RUNNING and one FATAL (status exits 3)."""
        sup = Sup(self, header + """
            [program:up]
            command = sleep 1000
            startsecs = 0
            [program:gone]
            command = sh -c 'exit 3'
            startsecs = 1
            startretries = 0
            """, **kw).start()
        sup.wait_state("up", "RUNNING")
        sup.wait_state("gone", "FATAL")
        return sup

    def test_the_supervisor_answers_lines_to_this_client_and_one_object_to_an_older_one(self):
        sup = self.up_and_gone("""
            [respawn]
            watch_self = false""")
        old = list(respawn.request(sup.sock, "status", {"names": []}, timeout=30))
        self.assertEqual(len(old), 1)
        self.assertEqual([s["name"] for s in old[0]["services"]], ["gone", "up"])
        data = respawn.request_whole(sup.sock, "status", {"names": [], "lines": True}, timeout=30)
        lines = data.decode().split("\n")
        head = json.loads(lines[0])
        self.assertEqual((head["ok"], head["lines"], head["all_ok"], lines[-1]), (True, 2, False, ""))
        self.assertEqual(head["supervisor"]["pid"], sup.proc.pid)
        self.assertNotIn("services", head)
        for line, was in zip(lines[1:-1], old[0]["services"]):
            svc = json.loads(line)
            self.assertEqual(line, json.dumps(svc))               # as the client would write it
            self.assertEqual(dict(svc, uptime=None), dict(was, uptime=None))
        data = respawn.request_whole(sup.sock, "status", {"names": ["up"], "lines": True}, timeout=30)
        self.assertEqual([json.loads(l)["name"] for l in data.decode().split("\n")[1:-1]], ["up"])
        self.assertTrue(json.loads(data.split(b"\n")[0])["all_ok"])
        bad = list(respawn.request(sup.sock, "status", {"lines": "yes"}, timeout=30))
        self.assertEqual(bad, [{"ok": False, "error": "bad request: lines must be true or false"}])
        # the command, as a user runs it
        p = sup.ctl("status", "--json")
        self.assertEqual((p.returncode, p.stderr), (3, ""))
        self.assertEqual(p.stdout, canonical_status_json(json.loads(p.stdout)) + "\n")
        self.assertEqual([s["name"] for s in json.loads(p.stdout)["services"]], ["gone", "up"])
        p = sup.ctl("status", "up")
        self.assertEqual(p.returncode, 0, p.stderr)
        self.assertRegex(p.stdout, r"^up +RUNNING +restarts 0  pid \d+, uptime ")
        p = sup.ctl("status", "--json", "nope")
        self.assertEqual((p.returncode, json.loads(p.stdout)), (1, {"error": "no such service: nope"}))
        self.assertEqual(sup.terminate(), 0)

    def test_this_client_against_a_1_0_0_supervisor(self):
        sup = self.up_and_gone(script=RELEASED)
        p = client_run(["-c", sup.config, "status", "--json"])
        self.assertEqual((p.returncode, p.stderr), (3, ""))
        doc = json.loads(p.stdout)
        self.assertEqual((doc["schema"], doc["supervisor"]["version"]), (1, "1.0.0"))
        self.assertEqual([s["name"] for s in doc["services"]], ["gone", "up"])
        self.assertEqual(p.stdout, canonical_status_json(doc) + "\n")
        p = client_run(["-c", sup.config, "status", "up"])
        self.assertEqual(p.returncode, 0, p.stderr)
        self.assertRegex(p.stdout, r"^up +RUNNING +.*pid \d+, uptime ")
        self.assertEqual(sup.terminate(), 0)


class TestClientReading(unittest.TestCase):
    """The client joins an answer's pieces once: a 1.5 MB status line is not
    copied and searched again at every read (issue 15)."""

    def serve(self, data, piece):
        d = tempfile.mkdtemp(prefix="respawn-read-")
        self.addCleanup(shutil.rmtree, d, True)
        path = os.path.join(d, "s.sock")
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.addCleanup(listener.close)
        listener.bind(path)
        listener.listen(1)

        def answer():
            conn, _ = listener.accept()
            with conn:
                conn.recv(65536)
                for at in range(0, len(data), piece):
                    conn.sendall(data[at:at + piece])
        thread = threading.Thread(target=answer, daemon=True)
        thread.start()
        self.addCleanup(thread.join, 10)
        return path

    def test_answers_in_any_pieces_come_out_whole_and_in_order(self):
        big = {"services": [{"name": "s%d" % i, "reason": "x" * (i % 50)} for i in range(1000)]}
        objects = [{"n": 1}, big, {"line": "caf\u00e9"}, {}, {"n": 2}]
        data = b"".join(json.dumps(o).encode() + b"\n" for o in objects)
        for piece in (1, 7, 4096, respawn.RECV_SIZE + 3, len(data)):
            with self.subTest(piece=piece):
                path = self.serve(data, piece)
                self.assertEqual(list(respawn.request(path, "status", timeout=30)), objects)
        # a last line without its newline is not an answer
        path = self.serve(b'{"n": 1}\n{"n": 2', 3)
        self.assertEqual(list(respawn.request(path, "status", timeout=30)), [{"n": 1}])


class TestLogStderr(unittest.TestCase):
    def follow_stderr(self, sup, name, n=0):
        proc = subprocess.Popen(respawn_argv(sup.script, ["-c", sup.config, "log", name, "-n", str(n), "-f",
                                 "--stderr"]), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True, env=sup.env)
        return LineReader(self, proc)

    def test_stderr_alone_from_memory_a_file_and_across_a_reexec(self):
        sup = Sup(self, CLIENT_CONFIG, copy_script=True).start()
        for name in ("both", "errfile", "merged", "mute", "dropped"):
            sup.wait_state(name, "RUNNING")
        wait_for(lambda: len(log_lines(sup, "both", 40)) >= 40, what="both's lines")
        # log NAME: both prefixed streams as they came; --stderr: stderr alone
        out = sup.ctl("log", "both", "-n", "40").stdout.splitlines()
        self.assertEqual({l.split()[0] for l in out}, {"out", "err"}, out)
        p = sup.ctl("log", "both", "-n", "10", "--stderr")
        self.assertEqual((p.returncode, p.stderr), (0, ""))
        errs = p.stdout.splitlines()
        self.assertEqual(len(errs), 10, errs)
        nums = [int(l.split()[1]) for l in errs]
        self.assertTrue(all(l.startswith("err ") for l in errs), errs)
        self.assertEqual(nums, list(range(nums[0], nums[0] + 10)))   # consecutive: none missed
        self.assertEqual(sup.ctl("log", "both", "--stderr", "-n", "0").stdout, "")
        # stderr in a file of its own: --stderr reads it; log NAME shows stdout (memory)
        wait_for(lambda: len(read_text(sup.path("errfile.err")).splitlines()) >= 3, what="errfile.err")
        errs = sup.ctl("log", "errfile", "--stderr", "-n", "3").stdout.splitlines()
        self.assertTrue(set(errs) <= set(read_text(sup.path("errfile.err")).splitlines()), errs)
        self.assertEqual(len(errs), 3)
        self.assertEqual(sup.ctl("log", "errfile").stdout, "out once\n")
        # stdout not kept: log NAME shows the stderr file
        wait_for(lambda: read_text(sup.path("mute.err")), what="mute.err")
        self.assertEqual(sup.ctl("log", "mute").stdout, "err z\n")
        self.assertEqual(sup.ctl("log", "mute", "--stderr").stdout, "err z\n")
        # merged into stdout, or not kept: said in one line, exit 1
        wait_for(lambda: "err m" in read_text(sup.path("merged.log")), what="merged.log")
        self.assertEqual(sup.ctl("log", "merged", "-n", "5").stdout, "out m\nerr m\n")
        one_line(self, sup.ctl("log", "merged", "--stderr"), 1,
                 r"^merged's stderr goes into its stdout \(redirect_stderr = true\): log merged shows both$")
        one_line(self, sup.ctl("log", "dropped", "--stderr"), 1,
                 r"^dropped's stderr is not kept \(stderr_logfile = none\)$")
        # -f --stderr: only stderr lines, in order, and still after a re-exec
        for name in ("both", "errfile"):
            reader = self.follow_stderr(sup, name, n=2)
            wait_for(lambda: len(reader.lines) >= 8, what="%s followed stderr" % name)
            seen = list(reader.lines)
            self.assertTrue(all(l.startswith("err ") for l in seen), seen)
            nums = [int(l.split()[1]) for l in seen]
            self.assertEqual(nums, sorted(set(nums)), seen)
            self.assertEqual(sup.ctl("reexec").returncode, 0)
            wait_for(lambda: len(reader.lines) >= len(seen) + 10, what="stderr lines after the re-exec")
            lines = list(reader.lines)
            self.assertTrue(all(l.startswith("err ") for l in lines), lines)
            nums = [int(l.split()[1]) for l in lines]
            self.assertEqual(nums, sorted(set(nums)), "a line twice or out of order")
            reader.stop()
        # the memory tail of stderr came across both re-execs, consecutive
        errs = sup.ctl("log", "both", "--stderr", "-n", "300").stdout.splitlines()
        nums = [int(l.split()[1]) for l in errs]
        self.assertGreater(len(nums), 40)
        self.assertEqual(nums, list(range(nums[0], nums[0] + len(nums))))
        self.assertEqual(sup.status()["supervisor"]["reexecs"], 2)
        # the protocol field is validated like the others
        reply = next(respawn.request(sup.sock, "log", {"name": "both", "stream": "stdout"}))
        self.assertEqual(reply, {"ok": False, "error": 'bad request: stream must be "stderr" or null'})
        self.assertEqual(sup.terminate(), 0)

    def test_an_older_supervisor_is_not_taken_for_stderr_alone(self):
        # a 1.0.0 supervisor ignores "stream": its answer has none, and the client says so
        fake = FakeSupervisor(self, b'{"ok": true, "lines": ["out 1", "err 1"]}\n')
        p = client_run(["-c", fake.config, "log", "x", "--stderr"])
        self.assertEqual((p.returncode, p.stdout), (1, ""))
        self.assertIn("cannot show stderr alone", p.stderr)
        self.assertEqual(client_run(["-c", fake.config, "log", "x"]).stdout, "out 1\nerr 1\n")


class TestOneCommandsHelp(unittest.TestCase):
    def test_help_command_and_dash_dash_help_show_that_commands_usage(self):
        # every command line below, run 4 at a time first (each is an interpreter
        # start), then judged in order
        words = [["--help"], ["help"], ["help", "help"], ["log", "--help"], ["status", "--help"],
                 ["help", "stat"], ["help", "a", "b"]]
        for command in (c for c in respawn.COMMANDS if c != "help"):
            words += [["help", command], [command, "--help"], [command, "-h"], ["--help", command]]
        with __import__("concurrent.futures").futures.ThreadPoolExecutor(4) as pool:
            ran = dict(zip(map(tuple, words), pool.map(client_run, words)))

        run = lambda args: ran[tuple(args)]      # noqa: E731
        whole = run(["--help"])
        self.assertEqual(whole.returncode, 0)
        self.assertEqual(run(["help"]).stdout, whole.stdout)
        self.assertEqual(run(["help", "help"]).returncode, 0)
        for command in respawn.COMMANDS:
            if command == "help":
                continue
            with self.subTest(command=command):
                p = run(["help", command])
                self.assertEqual((p.returncode, p.stderr), (0, ""))
                self.assertTrue(p.stdout.startswith("usage: respawn.py [-c FILE] %s" % command), p.stdout)
                self.assertNotEqual(p.stdout, whole.stdout)
                # a command needing names does not ask for them with --help
                for flag in ("--help", "-h"):
                    q = run([command, flag])
                    self.assertEqual((q.returncode, q.stdout, q.stderr), (0, p.stdout, ""))
                self.assertEqual(run(["--help", command]).stdout, p.stdout)
        log = run(["log", "--help"]).stdout
        for option in ("-n N", "-f, --follow", "--stderr"):
            self.assertIn(option, log)
        self.assertIn("--json", run(["status", "--help"]).stdout)
        for words, says in ((["help", "stat"], "unknown command 'stat' (did you mean 'status'?)"),
                            (["help", "a", "b"], "help takes one command, not a b")):
            p = run(words)
            self.assertEqual((p.returncode, p.stdout), (2, ""))
            self.assertIn(says, p.stderr)


class TestClientWording(unittest.TestCase):
    def test_plurals_and_suggestions(self):
        code, out, _ = run_check(self, "[program:a]\ncommand = sleep 1\n")
        self.assertEqual(code, 0)
        self.assertTrue(out.endswith(": ok, 1 service\n"), out)
        code, out, _ = run_check(self, "[program:a]\ncommand = sleep 1\n[program:b]\ncommand = sleep 1\n")
        self.assertTrue(out.endswith(": ok, 2 services\n"), out)
        for word, want in (("stat", "status"), ("star", "start"), ("stop", None), ("relod", "reload"),
                           ("sh", "shutdown"), ("re", None)):
            with self.subTest(word=word):
                if want is None and word in respawn.COMMANDS:
                    continue
                hint = respawn.suggest_command(word)
                if want:
                    self.assertEqual(hint, " (did you mean %r?)" % want)
                else:
                    self.assertNotIn("'re", hint)     # re: reload, restart, reexec: ambiguous prefix
        self.assertEqual(respawn.plural(1, "service"), "1 service")
        self.assertEqual(respawn.plural(0, "service"), "0 services")
        self.assertEqual(respawn.plural(2, "failed start"), "2 failed starts")

    def test_run_daemon_says_where_its_log_goes(self):
        sup = Sup(self, """
            [respawn]
            watch_self = false
            logdir = {dir}/logs
            [program:x]
            command = sleep 1000
            startsecs = 0
            """)
        TestDaemon.daemon_cleanup(self, sup)
        p = subprocess.run([PY, sup.script, "-c", sup.config, "run", "--daemon"], stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, text=True, timeout=60, env=sup.env)
        self.assertEqual((p.returncode, p.stderr), (0, ""))
        m = re.match(r"^started \(pid (\d+)\); its log: (.+)\n$", p.stdout)
        self.assertTrue(m, p.stdout)
        self.assertEqual(os.path.dirname(m.group(2)), sup.path("logs"))
        wait_for(lambda: os.path.exists(m.group(2)) and "supervising 1 service from" in read_text(m.group(2)),
                 what="the daemon's log in the place it named")


def proc_comm(pid):
    with open("/proc/%d/comm" % pid) as f:
        return f.read().rstrip("\n")


class TestProcessTitle(unittest.TestCase):
    def title_of(self, sup, count):
        return "respawn.py: supervising %s (%s)" % (respawn.plural(count, "service"), sup.config)

    def assert_title(self, sup, count, *args):
        want = self.title_of(sup, count).encode()
        wait_for(lambda: cmdline(sup.proc.pid)[:1] == [want], what="the title %r" % want)
        argv = cmdline(sup.proc.pid)
        real = [a for a in argv if a]
        self.assertEqual(argv[len(real):], [b""] * (len(argv) - len(real)))     # padding only
        self.assertEqual(real[1:], [os.fsencode(a) for a in args])
        self.assertNotIn(b"import marshal", b" ".join(argv))
        self.assertEqual(proc_comm(sup.proc.pid), "respawn.py")
        if shutil.which("ps"):
            ps = subprocess.run(["ps", "-ww", "-o", "args=", "-p", str(sup.proc.pid)], stdout=subprocess.PIPE,
                                text=True, timeout=30).stdout
            self.assertTrue(ps.startswith(self.title_of(sup, count) + " " + sup.script), ps)
            self.assertLess(len(ps.strip()), 400, ps)

    def test_ps_shows_the_title_after_start_reload_and_reexec(self):
        sup = Sup(self, """
            [respawn]
            watch_self = false
            [program:a]
            command = sleep 1000
            startsecs = 0
            """, copy_script=True).start()
        a = sup.wait_state("a", "RUNNING")
        self.assert_title(sup, 1, sup.script, "-c", sup.config, "run")
        # its services are not renamed: they exec their own command
        self.assertEqual(cmdline(a["pid"]), [b"sleep", b"1000"])
        self.assertEqual(proc_comm(a["pid"]), "sleep")
        self.assertIn(sup.proc.pid, supervisors_of(sup.config))   # still found by its arguments
        with open(sup.config, "a") as f:
            f.write("[program:b]\ncommand = sleep 1000\nstartsecs = 0\n")
        self.assertEqual(sup.ctl("reload").stdout, "added: b\n")
        self.assert_title(sup, 2, sup.script, "-c", sup.config, "run")
        self.assertEqual(sup.ctl("reexec").returncode, 0)
        self.assertEqual(cmdline(sup.proc.pid)[0], self.title_of(sup, 2).encode())
        argv = [a for a in cmdline(sup.proc.pid) if a]
        self.assertEqual(argv[-3:], [b"-c", os.fsencode(sup.config), b"run"])
        self.assertEqual(argv.count(b"--handoff"), 1)
        self.assertEqual(proc_comm(sup.proc.pid), "respawn.py")
        self.assertEqual(sup.terminate(), 0)


# ---------------------------------------------------------------------------
# Faults and hostile input at run time (issue 12): full disks, stalled or gone
# outputs, extreme values, malformed and fuzzed requests, descriptor limits
# ---------------------------------------------------------------------------

LINES = r"""
import itertools, sys, time
for i in itertools.count():
    if i == int((sys.argv[2:] or [-1])[0]):
        if sys.argv[3:]:
            open(sys.argv[3], "w").close()
        time.sleep(1000)                # a burst of that many lines, then quiet
    sys.stdout.write("%07d %s\n" % (i, "z" * 52))
    sys.stdout.flush()
    time.sleep(float(sys.argv[1]))
"""
LINE_RE = re.compile(r"^\d{7} z{52}$")


def cpu_seconds(pid):
    fields = proc_stat(pid)
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def sockets_of(pid):
    """How many sockets pid holds (its listener, its clients)."""
    n = 0
    for fd in os.listdir("/proc/%d/fd" % pid):
        try:
            n += os.readlink("/proc/%d/fd/%s" % (pid, fd)).startswith("socket:")
        except OSError:
            pass
    return n


def rss_kib(pid):
    return int(proc_status(pid)["VmRSS"].split()[0])


def fault_sup(test, config, **kw):
    text = textwrap.dedent(config).lstrip()
    if text.startswith("[respawn]\n"):          # into HEADER's section, not a second one
        text = text[len("[respawn]\n"):]
    sup = Sup(test, HEADER.rstrip("\n") + "\n" + text, **kw)
    write_file(sup.path("lines.py"), LINES)
    return sup


def start_with(sup, stdout=None, stderr=None, preexec_fn=None):
    """Sup.start with the supervisor's stdout and stderr (and limits) of the test's
    choosing; None: the files Sup reads back."""
    sup.out = open(sup.out_path, "ab")
    sup.err = open(sup.err_path, "ab")
    sup.proc = subprocess.Popen([PY, sup.script, "-c", sup.config, "run"],
                                stdout=sup.out if stdout is None else stdout,
                                stderr=sup.err if stderr is None else stderr, env=sup.env, start_new_session=True, cwd=sup.dir,
                                preexec_fn=preexec_fn)
    wait_for(lambda: sup.answers(), what="the supervisor's socket")
    return sup


def respawns(test, sup, name):
    """Kill a service; it comes back with a new pid."""
    pid = sup.wait_state(name, "RUNNING")["pid"]
    os.kill(pid, signal.SIGKILL)
    new = sup.wait_pid_change(name, pid)
    test.assertNotEqual(new["pid"], pid)


def respawns_by_log(sup, name):
    """respawns() for a supervisor that refuses clients: kill, and read its log."""
    started = lambda: re.findall(r"%s: started pid (\d+)" % name, sup.stderr())
    pids = wait_for(started, what="%s started" % name)
    os.kill(int(pids[-1]), signal.SIGKILL)
    wait_for(lambda: len(started()) > len(pids), what="%s started again" % name)


def small_tmpfs(test, size):
    """A fresh tmpfs of `size` bytes (we run as root in CI); skip where mount is refused."""
    d = tempfile.mkdtemp(prefix="respawn-tmpfs-")
    p = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=%d" % size, "tmpfs", d],
                       stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if p.returncode != 0:
        os.rmdir(d)
        test.skipTest("cannot mount a tmpfs (needs root): %s" % p.stdout.strip())
    # registered first, so it runs last: after the supervisor has closed its files
    test.addCleanup(os.rmdir, d)
    test.addCleanup(subprocess.run, ["umount", "-l", d])
    return d


def fill(path):
    """Fill the file system of path; the bytes written."""
    chunk, n = b"f" * 4096, 0
    with open(path, "wb", buffering=0) as f:
        while True:
            try:
                n += f.write(chunk)
            except OSError:
                return n


class TestFaultWriter(unittest.TestCase):
    """The Writer in-process: what cannot be written is dropped in whole lines, counted,
    and reported once per episode."""

    def test_a_full_pipe_drops_whole_lines_and_recovers(self):
        r, w = os.pipe()
        self.addCleanup(os.close, r)
        self.addCleanup(os.close, w)
        said = []
        out = respawn.Writer(w, "pipe", lambda level, message: said.append((level, message)))
        self.addCleanup(out.close)
        line = b"%07d " + b"p" * 92 + b"\n"
        total = 0
        for i in range(5000):                          # 500 KB into a 64 KiB pipe, nobody reading
            total += len(line % i)
            out.write(line % i)
        self.assertGreater(out.dropped, 0)
        self.assertEqual([l for l, _ in said], ["warn"], said)    # once for the whole episode
        data = b""
        os.set_blocking(r, False)
        while True:
            try:
                data += os.read(r, 1 << 16)
            except BlockingIOError:
                break
        out.last_drop -= 2.0                          # the episode's quiet second, without waiting
        out.write(b"after\n")
        data += os.read(r, 1 << 16)
        lines = data.split(b"\n")
        self.assertEqual(lines[-1], b"")
        self.assertEqual(lines[-2], b"after")
        for l in lines[:-2]:
            self.assertRegex(l, rb"^\d{7} p{92}$")       # no torn line
        self.assertEqual(len(data) + out.dropped, total + len(b"after\n"))
        self.assertEqual([l for l, _ in said], ["warn", "info"])
        self.assertIn("%d bytes were dropped" % out.dropped, said[1][1])

    def test_an_episode_ends_a_second_after_its_last_drop_with_no_more_writes(self):
        # a write goes through within the second of the last drop, then nothing more is
        # written: the recovery is said when that second is over (a timer), not at a next
        # write that may come hours later; a drop within the second puts it off
        r, w = os.pipe()
        self.addCleanup(os.close, r)
        self.addCleanup(os.close, w)
        os.set_blocking(r, False)
        said, timers = [], respawn.Timers()
        out = respawn.Writer(w, "pipe", lambda level, message: said.append(level), timers=timers)
        self.addCleanup(out.close)

        def until_a_drop():                            # lines of 1 KB: a pipe takes each whole or not
            while not out.write(b"x" * 1000 + b"\n"):
                pass

        def drained():
            while True:
                try:
                    os.read(r, 1 << 16)
                except BlockingIOError:
                    return

        until_a_drop()
        drained()
        out.last_drop = time.monotonic()               # the drop was just now
        self.assertEqual(out.write(b"through\n"), 0)
        self.assertEqual(said, ["warn"])               # not yet: within the second
        timers.run_due(time.monotonic() + 1.5)
        self.assertEqual(said, ["warn", "info"])       # its second is over
        until_a_drop()                                 # a second episode
        drained()
        out.last_drop = time.monotonic()
        self.assertEqual(out.write(b"through\n"), 0)
        until_a_drop()                                 # a drop within its second
        timers.run_due(time.monotonic() + 1.5)
        self.assertEqual(said, ["warn", "info", "warn"])   # not over
        drained()
        out.last_drop = time.monotonic()
        self.assertEqual(out.write(b"through\n"), 0)
        timers.run_due(time.monotonic() + 1.5)
        self.assertEqual(said, ["warn", "info", "warn", "info"])
        self.assertEqual(timers.timeout(time.monotonic()), respawn.MAX_WAIT)   # nothing left armed

    def test_a_slow_reader_loses_nothing_below_the_queue_bound(self):
        r, w = os.pipe()
        self.addCleanup(os.close, r)
        self.addCleanup(os.close, w)
        sel = selectors.DefaultSelector()
        self.addCleanup(sel.close)
        out = respawn.Writer(w, "pipe", lambda level, message: None, selector=sel)
        self.addCleanup(out.close)
        line = b"%07d " + b"s" * 92 + b"\n"
        sent = b"".join(line % i for i in range(8000))          # 800 KB at once: a burst
        self.assertEqual(out.write(sent), 0)
        self.assertTrue(out.armed)
        got = b""
        os.set_blocking(r, False)
        deadline = time.monotonic() + DEADLINE
        while len(got) < len(sent) and time.monotonic() < deadline:
            for key, mask in sel.select(0.1):
                key.data(mask)                                  # the loop's dispatch
            try:
                got += os.read(r, 1 << 16)
            except BlockingIOError:
                pass
        self.assertEqual(got, sent)
        self.assertFalse(out.armed)
        self.assertEqual(out.dropped, 0)
        # past the bound: whole lines are dropped, and what was queued still comes out
        more = b"".join(line % i for i in range(20000))         # 2 MB, nobody reading
        dropped = out.write(more)
        self.assertGreater(dropped, 0)
        self.assertEqual(dropped % len(line % 0), 0)
        while out.armed and time.monotonic() < deadline:
            for key, mask in sel.select(0.1):
                key.data(mask)
            try:
                got += os.read(r, 1 << 16)
            except BlockingIOError:
                pass
        try:
            got += os.read(r, 1 << 16)
        except BlockingIOError:
            pass
        tail = got[len(sent):]
        self.assertEqual(len(tail) + dropped, len(more))
        self.assertTrue(more.startswith(tail))

    def test_a_line_begun_in_a_file_is_finished_not_torn(self):
        r, w = os.pipe()
        self.addCleanup(os.close, r)
        self.addCleanup(os.close, w)
        out = respawn.Writer(w, "pipe")
        self.addCleanup(out.close)
        out.write(b"head of a line ")                 # a service's line, not finished yet
        n = 0
        while not out.failing:
            out.write(b"x" * 1000)                     # ... goes on, until the pipe is full
            n += 1
        out.write(b" its end\nnext\n" + b"y" * 10)     # its end kept; "next" and y.. dropped
        out.write(b"yyy\nwhole\n")                      # the rest of the y line dropped too
        os.set_blocking(r, False)
        data = b""
        while True:
            try:
                data += os.read(r, 1 << 16)
            except BlockingIOError:
                break
        out.last_drop -= 2.0
        out.write(b"later\n")
        data += os.read(r, 1 << 16)
        self.assertTrue(data.startswith(b"head of a line "))
        self.assertEqual(data.split(b"\n")[1:], [b"later", b""], data[-200:])
        self.assertTrue(data.split(b"\n")[0].endswith(b" its end"))

    def test_a_log_file_that_cannot_be_reopened_is_tried_again(self):
        d = temp_dir(self)
        said = []
        log = respawn.LogFile(os.path.join(d, "sub", "x.log"), 0, 0,
                              lambda level, message: said.append(message))
        self.addCleanup(log.close)
        log.write(b"one\n")
        os.rename(os.path.join(d, "sub"), os.path.join(d, "old"))
        write_file(os.path.join(d, "sub"), "a file where the folder was")
        log.reopen()                                   # SIGUSR1: cannot open, said once
        self.assertEqual(log.write(b"two\n"), 4)      # dropped, not raised
        self.assertEqual(len(said), 1, said)
        self.assertIn("cannot open it", said[0])
        os.unlink(os.path.join(d, "sub"))
        log.open_failed -= 2 * log.REOPEN_EVERY        # its next try is due
        self.assertEqual(log.write(b"three\n"), 0)
        log.out.last_drop -= 2.0                        # and a quiet second has passed
        self.assertEqual(log.write(b"four\n"), 0)
        self.assertEqual(read_text(os.path.join(d, "sub", "x.log")), "three\nfour\n")
        self.assertEqual(len(said), 2, said)
        self.assertIn("again; 4 bytes were dropped", said[1])

    def test_a_full_file_keeps_no_half_line(self):
        d = small_tmpfs(self, 64 * 1024)
        path = os.path.join(d, "f.log")
        log = respawn.LogFile(path, 0, 0)
        self.addCleanup(log.close)
        line = b"%07d " + b"q" * 52 + b"\n"
        i = 0
        while not log.out.failing:
            log.write(line % i)
            i += 1
        for j in range(i, i + 100):
            log.write(line % j)
        with open(path, "rb") as f:
            data = f.read()
        self.assertTrue(data.endswith(b"\n"), data[-80:])
        for l in data.split(b"\n")[:-1]:
            self.assertRegex(l, rb"^\d{7} q{52}$")
        self.assertEqual(len(data) + log.dropped, (i + 100) * len(line % 0))


class TestFaultOutput(unittest.TestCase):
    """The supervisor's outputs fail: /dev/full, a pipe nobody reads, a full disk."""

    CONFIG = """\
        [program:chatty]
        command = {py} {dir}/lines.py 0.01
        startsecs = 0
        [program:filed]
        command = {py} {dir}/lines.py 0.01
        stdout_logfile = /dev/full
        startsecs = 0
        [program:victim]
        command = sleep 1000
        startsecs = 0
        """

    def test_stdout_and_stderr_on_dev_full(self):
        # everything to /dev/full: the log too, so nothing tells but the counters
        sup = fault_sup(self, self.CONFIG)
        full = open("/dev/full", "wb")
        self.addCleanup(full.close)
        start_with(sup, full, full)
        wait_for(lambda: all(s["dropped_bytes"] > 0 for s in sup.status()["services"]
                             if s["name"] != "victim"), what="output counted as dropped")
        self.assertGreater(sup.status()["supervisor"]["dropped_bytes"], 0)
        respawns(self, sup, "victim")
        respawns(self, sup, "chatty")
        self.assertEqual(sup.terminate(), 0)

    def test_stdout_on_dev_full_is_said_once(self):
        sup = fault_sup(self, "[respawn]\nlogfile = {dir}/sup.log\n" + textwrap.dedent(self.CONFIG))
        full = open("/dev/full", "wb")
        self.addCleanup(full.close)
        start_with(sup, full)
        log = sup.path("sup.log")
        wait_for(lambda: "filed: cannot write to /dev/full" in read_text(log), what="the warning")
        wait_for(lambda: "cannot write to stdout" in read_text(log), what="the warning")
        n = sup.svc("chatty")["dropped_bytes"]
        wait_for(lambda: sup.svc("chatty")["dropped_bytes"] > n, what="more dropped")
        respawns(self, sup, "victim")
        self.assertEqual(sup.terminate(), 0)
        text = read_text(log)
        self.assertEqual(text.count("cannot write to stdout"), 1, text)
        self.assertEqual(text.count("filed: cannot write to /dev/full"), 1, text)
        self.assertNotIn("internal error", text)
        self.assertNotIn("Traceback", text + sup.stderr())

    def test_a_pipe_nobody_reads(self):
        sup = fault_sup(self, """\
            [program:flood]
            command = {py} {dir}/lines.py 0 300000
            startsecs = 0
            [program:ticker]
            command = {py} {dir}/lines.py 0.1
            startsecs = 0
            [program:victim]
            command = sleep 1000
            startsecs = 0
            """)
        r, w = os.pipe()
        self.addCleanup(os.close, r)
        try:
            start_with(sup, w, w)
        finally:
            os.close(w)
        wait_for(lambda: sup.svc("flood")["dropped_bytes"] > 1 << 20, what="a full pipe")
        respawns(self, sup, "victim")              # it answers status and supervises meanwhile
        # a reader at last: what comes through is whole lines, and the log says it resumed
        got, stop = [], threading.Event()

        def drain():
            while not stop.is_set():
                data = os.read(r, 1 << 16)
                if not data:
                    return
                got.append(data)
        reader = threading.Thread(target=drain, daemon=True)
        reader.start()
        self.addCleanup(reader.join, 10)
        self.addCleanup(stop.set)
        wait_for(lambda: b"bytes were dropped" in b"".join(got), what="the recovery line")
        self.assertEqual(sup.terminate(), 0)
        reader.join(DEADLINE)
        text = b"".join(got).decode()
        self.assertEqual(text.count("cannot write to stdout and stderr"), 0)   # it could not be said
        for line in text.splitlines():
            if line.startswith(("flood | ", "ticker | ")):
                self.assertRegex(line.split(" | ", 1)[1], LINE_RE)
            else:
                self.assertRegex(line, r"^\d{4}-\d\d-\d\d [\d:.]+ (INFO|WARN|ERROR) ")
        self.assertNotIn("internal error", text)

    def burst_to_unread_stdout(self, lines):
        """A supervisor whose stdout is a pipe nobody reads yet, and a service that
        writes `lines` lines at once: (sup, read end)."""
        sup = fault_sup(self, """\
            [respawn]
            logfile = {dir}/sup.log
            [program:burst]
            command = {py} {dir}/lines.py 0 %d {dir}/burst.done
            startsecs = 0
            """ % lines)
        r, w = os.pipe()
        self.addCleanup(os.close, r)
        try:
            start_with(sup, w)
        finally:
            os.close(w)
        wait_for(lambda: os.path.exists(sup.path("burst.done")), what="the burst written")
        return sup, r

    def read_late(self, r):
        """Start reading r now: the list its bytes are appended to."""
        got = []
        reader = threading.Thread(target=lambda: got.extend(iter(lambda: os.read(r, 1 << 16), b"")),
                                  daemon=True)
        reader.start()
        self.addCleanup(reader.join, 10)
        return got, reader

    def test_a_burst_waits_for_a_late_reader(self):
        # 5000 lines (340 KB) while nobody reads: they wait, nothing is dropped
        sup, r = self.burst_to_unread_stdout(5000)
        got, _ = self.read_late(r)
        wait_for(lambda: b"".join(got).count(b"burst | ") == 5000, what="every line")
        self.assertEqual(sup.svc("burst")["dropped_bytes"], 0)
        self.assertEqual(sup.terminate(), 0)
        for line in b"".join(got).decode().splitlines():
            self.assertRegex(line.split(" | ", 1)[1], LINE_RE)
        self.assertNotIn("cannot write", read_text(sup.path("sup.log")))

    def test_what_waits_for_a_late_reader_crosses_a_reexec(self):
        # a burst (456 KB) while nobody reads stdout: most of it waits in the
        # supervisor; a re-exec hands it over, then a second burst follows it
        sup, r = self.burst_to_unread_stdout(6000)
        os.unlink(sup.path("burst.done"))
        before = sup.status()["supervisor"]["reexecs"]
        self.assertEqual(sup.ctl("reexec").returncode, 0)
        wait_for(lambda: sup.status()["supervisor"]["reexecs"] == before + 1, what="the re-exec")
        self.assertEqual(sup.ctl("restart", "burst").returncode, 0)
        wait_for(lambda: os.path.exists(sup.path("burst.done")), what="the second burst written")
        got, reader = self.read_late(r)
        wait_for(lambda: b"".join(got).count(b"burst | ") >= 12000, what="every line")
        self.assertEqual(sup.svc("burst")["dropped_bytes"], 0)
        self.assertEqual(sup.terminate(), 0)
        reader.join(DEADLINE)
        lines = b"".join(got).decode().splitlines()
        for line in lines:
            self.assertRegex(line.split(" | ", 1)[1], LINE_RE)
        # every line once, in order: the first burst whole, and only then the second
        self.assertEqual([int(l.split(" | ", 1)[1][:7]) for l in lines], list(range(6000)) * 2)
        self.assertNotIn("cannot write", read_text(sup.path("sup.log")))

    def test_stdout_whose_reader_is_gone(self):
        sup = fault_sup(self, "[respawn]\nlogfile = {dir}/sup.log\n" + textwrap.dedent(self.CONFIG))
        r, w = os.pipe()
        try:
            start_with(sup, w)
        finally:
            os.close(w)
        os.close(r)                                  # EPIPE from now on (SIGPIPE is ignored)
        wait_for(lambda: sup.svc("chatty")["dropped_bytes"] > 0, what="output dropped")
        respawns(self, sup, "victim")
        respawns(self, sup, "chatty")
        self.assertEqual(sup.terminate(), 0)
        text = read_text(sup.path("sup.log"))
        self.assertEqual(text.count("cannot write to stdout (Broken pipe)"), 1, text)
        self.assertNotIn("internal error", text)

    def test_a_full_disk_under_both_logs(self):
        # 2 MiB: once the filler is gone the writer (30 KB/s at most) would need a minute
        # to fill it again, so the episode that ends is the only one (in 256 KiB it began
        # again 9 s later, on a machine slow enough); under 4 MiB free: no splice
        d = small_tmpfs(self, 2 << 20)
        sup = fault_sup(self, """\
            [respawn]
            logfile = %s/sup.log
            [program:writer]
            command = {py} {dir}/lines.py 0.002
            stdout_logfile = %s/writer.log
            stdout_logfile_maxbytes = 0
            startsecs = 0
            [program:victim]
            command = sleep 1000
            startsecs = 0
            """ % (d, d))
        sup.start()
        log = os.path.join(d, "writer.log")
        wait_for(lambda: os.path.exists(log) and os.path.getsize(log) > 6000, what="lines written")
        filler = os.path.join(d, "filler")
        fill(filler)
        wait_for(lambda: sup.svc("writer")["dropped_bytes"] > 10000, what="output dropped")
        respawns(self, sup, "victim")               # its lines go nowhere, and are counted
        for _ in range(400):                        # a line each, until the log's last page is full
            if sup.status()["supervisor"]["dropped_bytes"]:
                break
            self.assertTrue(next(respawn.request(sup.sock, "reload"))["ok"])
        self.assertGreater(sup.status()["supervisor"]["dropped_bytes"], 0)
        wait_for(lambda: "cannot write to the logfile" in sup.stderr(), what="stderr told")
        os.unlink(filler)                           # space comes back
        wait_for(lambda: "writer: writing to %s/writer.log again" % d in read_text(os.path.join(d, "sup.log")),
                 what="the recovery in the log")
        wait_for(lambda: "writing to the logfile %s/sup.log again" % d in read_text(os.path.join(d, "sup.log")),
                 what="the log's own recovery")
        respawns(self, sup, "victim")
        self.assertEqual(sup.terminate(), 0)
        lines = read_text(os.path.join(d, "writer.log")).split("\n")
        self.assertEqual(lines[-1], "")
        for line in lines[:-1]:
            self.assertRegex(line, LINE_RE)          # no torn line, before or after
        numbers = [int(l.split()[0]) for l in lines[:-1]]
        self.assertEqual(numbers, sorted(numbers))
        self.assertTrue(any(b - a > 1 for a, b in zip(numbers, numbers[1:])), "no gap: nothing dropped?")
        own = read_text(os.path.join(d, "sup.log"))
        for line in own.splitlines():
            self.assertRegex(line, r"^\d{4}-\d\d-\d\d [\d:.]+ (INFO|WARN|ERROR) ")
        # one episode, said when it began (unless the full disk took that line too) and
        # when it ended, never a line per write; the log's own episode likewise
        said = re.findall(r"writer: (cannot write to|writing to) ", own)
        self.assertIn(said, [["cannot write to", "writing to"], ["writing to"]], own)
        self.assertEqual(own.count("writing to the logfile"), 1, own)
        self.assertEqual(sup.stderr().count("cannot write to the logfile"), 1, sup.stderr())
        self.assertNotIn("internal error", own)

    def full_own_log(self, sup, d):
        """Fill the tmpfs of the supervisor's log, and log a line each until one is
        dropped (the log's last page is full); free it again: the bytes dropped."""
        before = sup.status()["supervisor"]["dropped_bytes"]
        filler = os.path.join(d, "filler")
        fill(filler)
        for _ in range(400):
            if sup.status()["supervisor"]["dropped_bytes"] > before:
                break
            self.assertTrue(next(respawn.request(sup.sock, "reload"))["ok"])
        lost = sup.status()["supervisor"]["dropped_bytes"] - before
        self.assertGreater(lost, 0)
        os.unlink(filler)
        return lost

    def own_log_sup(self):
        d = small_tmpfs(self, 256 * 1024)
        sup = fault_sup(self, """\
            [respawn]
            logfile = %s/sup.log
            [program:victim]
            command = sleep 1000
            startsecs = 0
            """ % d)
        sup.start()
        return sup, d, os.path.join(d, "sup.log")

    def test_its_own_log_says_it_is_back_when_nothing_else_is_logged(self):
        # the log takes lines again within the second of its last drop, and then nothing
        # happens: what it missed is said when that second is over, not with whatever
        # line comes next (hours later, far from the gap)
        sup, d, log = self.own_log_sup()
        lost = self.full_own_log(sup, d)
        respawns(self, sup, "victim")                 # lines that go in
        back = "writing to the logfile %s again; %d bytes were dropped" % (log, lost)
        wait_for(lambda: back in read_text(log), what="the log's recovery")
        lines = read_text(log).splitlines()
        self.assertIn("victim: running", lines[-2])  # the lines that went in, then the news
        self.assertIn(back, lines[-1])
        self.assertEqual(sup.stderr().count("cannot write to the logfile"), 1, sup.stderr())
        self.assertEqual(sup.terminate(), 0)

    def test_its_own_log_reopened_while_it_drops_still_says_it_is_back(self):
        # SIGUSR1 and a reload open the log anew: the episode goes on in the new
        # descriptor, and its end is said with all it dropped
        sup, d, log = self.own_log_sup()
        for round, how in enumerate(("got SIGUSR1", "reloaded")):
            lost = self.full_own_log(sup, d)
            if how == "got SIGUSR1":
                os.kill(sup.proc.pid, signal.SIGUSR1)  # its line goes in before the reopen
            else:
                self.assertTrue(next(respawn.request(sup.sock, "reload"))["ok"])
            back = "writing to the logfile %s again" % log
            wait_for(lambda: read_text(log).count(back) == round + 1,
                     what="the log's recovery after %r" % how)
            lines = read_text(log).splitlines()
            self.assertIn(how, lines[-2])
            self.assertIn("%s; %d bytes were dropped" % (back, lost), lines[-1])
            self.assertEqual(sup.stderr().count("cannot write to the logfile"), round + 1, sup.stderr())
        respawns(self, sup, "victim")
        self.assertEqual(sup.terminate(), 0)


class TestFaultExtremeValues(unittest.TestCase):
    """The largest durations check accepts run: timers days away, a loop that still turns."""

    def test_the_longest_durations(self):
        longest = "%d" % getattr(respawn, "MAX_DURATION", 30 * 86400)
        sup = fault_sup(self, """\
            [program:slow]
            command = sleep 1000
            startsecs = {longest}
            [program:probed]
            command = sleep 1000
            startsecs = 0
            healthcheck = exec:true
            healthcheck_interval = {longest}
            stopwaitsecs = {longest}
            backoff = {longest}
            backoff_max = {longest}
            [program:victim]
            command = sleep 1000
            startsecs = 0
            ready_timeout = {longest}
            """.replace("{longest}", longest))
        p = sup.ctl("check")
        self.assertEqual(p.returncode, 0, p.stdout + p.stderr)
        sup.start()
        sup.wait_state("slow", "STARTING")
        sup.wait_state("probed", "RUNNING")
        respawns(self, sup, "victim")
        respawns(self, sup, "probed")
        for _ in range(3):
            self.assertEqual(len(sup.status()["services"]), 3)
        self.assertEqual(sup.terminate(), 0)
        self.assertNotIn("internal error", sup.stderr())


class TestFaultControl(unittest.TestCase):
    """Malformed, fuzzed, stalled and too many clients: one answer and a close each,
    and supervision goes on."""

    def start(self):
        sup = fault_sup(self, """\
            [program:victim]
            command = sleep 1000
            startsecs = 0
            """)
        return sup.start()

    def exchange(self, sup, payload, timeout=DEADLINE):
        """Send raw bytes; every answer line until the supervisor closes."""
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(timeout)
            s.connect(sup.sock)
            try:
                s.sendall(payload)
            except (BrokenPipeError, ConnectionResetError):
                pass
            data = b""
            while True:
                try:
                    chunk = s.recv(65536)
                except ConnectionResetError:
                    chunk = b""
                if not chunk:
                    break
                data += chunk
        return [json.loads(l) for l in data.decode().splitlines()]

    MALFORMED = [
        b'{"v": "1", "cmd": "status"}', b'{"v": null, "cmd": "status"}', b'{"v": [1], "cmd": "status"}',
        b'{"v": true, "cmd": "status"}', b'{"v": 1e999, "cmd": "status"}', b'{"v": 0, "cmd": "status"}',
        b'{"v": ' + b"9" * 5000 + b', "cmd": "status"}', b'{"v": -1, "cmd": "status"}',
        b'{"v": 1, "cmd": 7}', b'{"v": 1, "cmd": null}', b'{"v": 1, "cmd": ["status"]}', b'{"v": 1}',
        b'{"v": 1, "cmd": "status", "args": []}', b'{"v": 1, "cmd": "status", "args": "x"}',
        b'{"v": 1, "cmd": "status", "args": {"names": "victim"}}',
        b'{"v": 1, "cmd": "status", "args": {"names": [1, 2]}}',
        b'{"v": 1, "cmd": "status", "args": {"names": [["victim"]]}}',
        b'{"v": 1, "cmd": "status", "args": {"names": {"a": 1}}}',
        b'{"v": 1, "cmd": "stop", "args": {"names": 5}}',
        b'{"v": 1, "cmd": "start", "args": {"names": [null]}}',
        b'{"v": 1, "cmd": "log", "args": {"name": "victim", "n": "20"}}',
        b'{"v": 1, "cmd": "log", "args": {"name": "victim", "n": 1e999}}',
        b'{"v": 1, "cmd": "log", "args": {"name": "victim", "n": -5}}',
        b'{"v": 1, "cmd": "log", "args": {"name": "victim", "n": 10000000000}}',
        b'{"v": 1, "cmd": "log", "args": {"name": "victim", "n": true}}',
        b'{"v": 1, "cmd": "log", "args": {"name": "victim", "n": null}}',
        b'{"v": 1, "cmd": "log", "args": {"name": null}}',
        b'{"v": 1, "cmd": "log", "args": {"name": ["victim"]}}',
        b'{"v": 1, "cmd": "log", "args": {"name": "victim", "follow": "yes"}}',
        b'{"v": 1, "cmd": "signal", "args": {"names": ["victim"], "signal": ["KILL"]}}',
        b'{"v": 1, "cmd": "signal", "args": {"names": ["victim"], "signal": 1e99}}',
        b'{"v": 1, "cmd": "signal", "args": {"names": ["victim"], "signal": ' + b"9" * 5000 + b'}}',
        b"[" * 30000 + b"]" * 30000, b'{"v": 1, "cmd": "status", "args": {"names": ' + b"[" * 20000 + b"]" * 20000 + b"}}",
        b"[1, 2]", b"42", b'"status"', b"null", b"\xff\xfe{}", b'{"v": 1, "cmd": "sta\xc3\x28tus"}',
        b'{"v": 1, "cmd": "status"\x00}', b"\x00" * 100, b"", b"{", b'{"v": 1, "cmd": "\\u0000"}',
        b'{"v": 1, "cmd": "status", "args": {"names": ["vic\\u0000tim"]}}',
    ]

    def test_malformed_requests_get_one_answer_and_a_close(self):
        sup = self.start()
        for payload in self.MALFORMED:
            answers = self.exchange(sup, payload + b"\n")
            self.assertEqual(len(answers), 1, payload[:80])
            self.assertFalse(answers[0]["ok"], payload[:80])
            self.assertIsInstance(answers[0]["error"], str)
        # no args, or no names, are plain requests, answered as such
        for payload in (b'{"v": 1, "cmd": "status", "args": null}',
                        b'{"v": 1, "cmd": "status", "args": {"names": null}}'):
            answers = self.exchange(sup, payload + b"\n")
            self.assertEqual(len(answers), 1, payload)
            self.assertTrue(answers[0]["ok"], answers)
        respawns(self, sup, "victim")
        self.assertEqual(sup.terminate(), 0)

    def test_fuzzed_requests(self):
        sup = self.start()
        pid = sup.proc.pid
        rng = random.Random(12)

        def value(depth=0):
            kind = rng.randrange(12)
            if kind == 0:
                return None
            if kind == 1:
                return rng.choice([True, False])
            if kind == 2:
                return rng.choice([0, 1, -1, 2 ** 31, 2 ** 63, -2 ** 63, 10 ** 30, rng.randrange(-99, 99)])
            if kind == 3:
                return rng.choice([0.5, -1e308, 1e308, 1e-300])
            if kind == 4 and depth < 6:
                return [value(depth + 1) for _ in range(rng.randrange(4))]
            if kind == 5 and depth < 6:
                return {rng.choice(["names", "name", "n", "signal", "x", ""]): value(depth + 1)
                        for _ in range(rng.randrange(4))}
            if kind == 6:
                return rng.choice(["victim", "all", "KILL", "0", "9", "-1"])   # no stop, no kill: see cmd
            return "".join(rng.choice("ab\x00\u00e9\u2028\ud7ff\U0001f600\"\\{}[]:, 9") for _ in range(rng.randrange(12)))

        def request():
            # commands that cannot stop the victim or the supervisor, whatever the args
            req = {"v": rng.choice([1, 1, 1, value()]), "cmd": rng.choice(["status", "log", "nope", value()]),
                   "args": rng.choice([{}, value(), {k: value() for k in rng.sample(
                       ["names", "name", "n", "signal", "other"], rng.randrange(1, 4))}])}
            for key in list(req):
                if rng.random() < 0.1:
                    del req[key]
            data = json.dumps(req).encode()
            r = rng.random()
            if r < 0.1:                             # bytes flipped
                data = bytearray(data)
                for _ in range(rng.randrange(1, 4)):
                    data[rng.randrange(len(data))] = rng.randrange(256)
                data = bytes(data).replace(b"\n", b" ")
            elif r < 0.15:
                data = data[:rng.randrange(len(data))]   # cut short
            return data + b"\n"

        def fuzz(count):
            for _ in range(count):
                payload = request()
                answers = self.exchange(sup, payload)
                self.assertLessEqual(len(answers), 1, payload)
                if answers and "services" not in answers[0] and "lines" not in answers[0]:
                    self.assertIn("error", answers[0], payload)

        fuzz(300)                                   # settle: imports, buffers, first allocations
        fds, rss = fd_count(pid), rss_kib(pid)
        fuzz(3000)
        self.assertLessEqual(fd_count(pid), fds + 2)
        self.assertLess(rss_kib(pid) - rss, 8 * 1024, "memory grew by more than 8 MiB")
        respawns(self, sup, "victim")
        self.assertEqual(sup.terminate(), 0)

    def test_stalled_clients_meet_a_deadline_for_the_whole_request(self):
        sup = self.start()
        pid = sup.proc.pid
        wait_for(lambda: sockets_of(pid) == 1, what="only the listener")
        fds = fd_count(pid)
        for i in range(50):
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            self.addCleanup(s.close)
            s.connect(sup.sock)
            s.sendall(b'{"v": 1, "cmd": "status", "args": {"names": ["vic')
        wait_for(lambda: sockets_of(pid) == 51, what="50 clients accepted")
        # one that trickles a byte at a time never finishes: no read resets its deadline
        trickler = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.addCleanup(trickler.close)
        trickler.connect(sup.sock)
        trickler.settimeout(0.2)
        t0 = time.monotonic()
        closed = False
        while time.monotonic() - t0 < respawn.CLIENT_TIMEOUT + DEADLINE:
            try:
                trickler.send(b" ")
                if trickler.recv(100) == b"":
                    closed = True
                    break
            except socket.timeout:
                continue
            except (BrokenPipeError, ConnectionResetError):
                closed = True
                break
        self.assertTrue(closed, "a trickling client was never closed")
        respawns(self, sup, "victim")
        wait_for(lambda: sockets_of(pid) == 1, what="every stalled client closed")
        self.assertLessEqual(fd_count(pid), fds)
        self.assertEqual(sup.terminate(), 0)

    def test_more_clients_than_the_bound_are_refused_politely(self):
        sup = self.start()
        pid = sup.proc.pid
        held = []
        wait_for(lambda: sockets_of(pid) == 1, what="only the listener")
        for _ in range(respawn.MAX_CLIENTS):
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            self.addCleanup(s.close)
            s.connect(sup.sock)
            held.append(s)
        wait_for(lambda: sockets_of(pid) == 1 + respawn.MAX_CLIENTS, what="the clients accepted")
        answers = self.exchange(sup, b'{"v": 1, "cmd": "status"}\n')
        self.assertEqual(len(answers), 1)
        self.assertFalse(answers[0]["ok"])
        self.assertIn("too many control connections", answers[0]["error"])
        p = sup.ctl("status")
        self.assertNotEqual(p.returncode, 0)
        self.assertIn("too many control connections", p.stdout + p.stderr)
        respawns_by_log(sup, "victim")          # supervision goes on at the bound
        for s in held:
            s.close()
        wait_for(lambda: sup.answers(), what="status once the clients went away")
        respawns(self, sup, "victim")
        self.assertEqual(sup.terminate(), 0)


class TestFaultDescriptors(unittest.TestCase):
    """RLIMIT_NOFILE reached: clients are refused before services run short, and an
    accept() that fails is paused, not spun on."""

    WATCH = r"""
import os, resource, selectors, signal, subprocess, sys, time
sys.path.insert(0, sys.argv[1])
import respawn
if not respawn.pidfds_work():
    print("no pidfds"); sys.exit(0)           # Python 3.8, or an old kernel
w = respawn.PidfdWatcher(selectors.DefaultSelector(), False)
assert w.needs_sigchld
child = subprocess.Popen(["sh", "-c", "exit 7"])
child.returncode = 0                  # ours to reap, as spawn() leaves it
got = []
soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
resource.setrlimit(resource.RLIMIT_NOFILE, (3, hard))   # not one descriptor more
w.watch(child.pid, lambda pid, status: got.append((pid, status)))
resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
assert child.pid in w.unwatched and not w.pidfds, (w.unwatched, w.pidfds)
deadline = time.monotonic() + 20
while not got and time.monotonic() < deadline:
    w.sigchld()                       # what the loop does at each SIGCHLD
    time.sleep(0.01)
print(got == [(child.pid, 7)], not w.unwatched)
"""

    def test_a_child_without_a_pidfd_is_still_watched(self):
        p = subprocess.run([PY, "-c", self.WATCH, HERE], stdout=subprocess.PIPE,
                           stderr=subprocess.STDOUT, text=True, timeout=60)
        if p.stdout.strip() == "no pidfds":
            self.skipTest("no os.pidfd_open here (Python 3.8 or a kernel before 5.3)")
        self.assertEqual(p.stdout.strip(), "True True", p.stdout)

    def test_closed_stdout_and_stderr_become_dev_null(self):
        sup = fault_sup(self, """\
            [respawn]
            logfile = {dir}/sup.log
            [program:chatty]
            command = {py} {dir}/lines.py 0.01
            startsecs = 0
            """)
        def close_outputs():
            os.close(1)
            os.close(2)
        start_with(sup, preexec_fn=close_outputs)
        pid = sup.proc.pid
        for fd in (1, 2):
            self.assertEqual(os.readlink("/proc/%d/fd/%d" % (pid, fd)), "/dev/null")
        respawns(self, sup, "chatty")
        self.assertEqual(sup.svc("chatty")["dropped_bytes"], 0)
        self.assertEqual(sup.terminate(), 0)
        self.assertNotIn("internal error", read_text(sup.path("sup.log")))

    def test_a_low_descriptor_limit_keeps_descriptors_for_services(self):
        import resource
        sup = fault_sup(self, """\
            [program:victim]
            command = sleep 1000
            startsecs = 0
            """)
        limit = 64
        start_with(sup, preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (limit, limit)))
        pid = sup.proc.pid
        held, refused = [], 0
        for _ in range(80):
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            self.addCleanup(s.close)
            s.connect(sup.sock)
            held.append(s)
        for s in held:
            s.settimeout(0.05)
            try:
                data = s.recv(4096)
            except socket.timeout:
                continue
            if b"short of file descriptors" in data:
                refused += 1
        self.assertGreater(refused, 0)
        self.assertLessEqual(fd_count(pid), limit - respawn.FD_RESERVE + 1)
        p = sup.ctl("status")                       # refused, politely
        self.assertIn("short of file descriptors", p.stdout + p.stderr)
        for _ in range(3):
            respawns_by_log(sup, "victim")          # the reserve is the services'
        for s in held:
            s.close()
        wait_for(lambda: sup.answers(), what="status once the clients went away")
        respawns(self, sup, "victim")
        self.assertEqual(sup.terminate(), 0)
        self.assertNotIn("internal error", sup.stderr())

    def test_emfile_pauses_accept_until_a_descriptor_frees(self):
        import resource
        sup = fault_sup(self, """\
            [program:victim]
            command = sleep 1000
            startsecs = 0
            """)
        sup.start()
        pid = sup.proc.pid
        sup.wait_state("victim", "RUNNING")
        before = resource.prlimit(pid, resource.RLIMIT_NOFILE)
        self.addCleanup(lambda: sup.proc.poll() is None and resource.prlimit(pid, resource.RLIMIT_NOFILE, before))
        # not one more descriptor, whatever the holes in its table
        resource.prlimit(pid, resource.RLIMIT_NOFILE, (3, before[1]))
        waiting = []
        for _ in range(10):
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            self.addCleanup(s.close)
            s.connect(sup.sock)                      # queued in the listen backlog
            s.sendall(b'{"v": 1, "cmd": "status"}\n')
            waiting.append(s)
        sup.wait_log("control socket: cannot accept (Too many open files)")
        cpu, t0 = cpu_seconds(pid), time.monotonic()
        wait_for(lambda: time.monotonic() - t0 > 3, what="three seconds")
        self.assertLess(cpu_seconds(pid) - cpu, 1.0, "the supervisor spins on a failing accept")
        self.assertEqual(sup.stderr().count("cannot accept"), 1)
        resource.prlimit(pid, resource.RLIMIT_NOFILE, before)
        for s in waiting:
            s.settimeout(DEADLINE)
            answer = json.loads(s.makefile("rb").readline())
            self.assertTrue(answer["ok"])
            self.assertIn("services", answer)
        sup.wait_log("control socket: accepting connections again")
        respawns(self, sup, "victim")
        self.assertEqual(sup.terminate(), 0)
        self.assertEqual(sup.stderr().count("cannot accept"), 1)

# ---------------------------------------------------------------------------
# Identity and adoption (issue 11): one supervisor per config whatever the
# environment; services outlive a killed supervisor and the next one adopts them
# ---------------------------------------------------------------------------

def _others_can_run(path):
    """path, and every folder above it, open to other users (nobody can exec it)."""
    path = os.path.realpath(path)
    if not os.path.isfile(path) or not os.stat(path).st_mode & 0o005 == 0o005:
        return False
    while path != "/":
        path = os.path.dirname(path)
        if not os.stat(path).st_mode & 0o001:
            return False
    return True


# pyenv's interpreters live under /root, which nobody cannot enter (.ci/run
# installs Debian's python3 for these tests)
NOBODY_PY = next((p for p in (PY, "/usr/bin/python3", "/usr/local/bin/python3") if _others_can_run(p)),
                 "/usr/bin/python3")

# each line in one write(): a pipe write of up to PIPE_BUF bytes is atomic, so the
# supervisor never reads half a line of it (print() under -u writes "n", " ", "21",
# "\n" apiece, and a supervisor killed between two of them loses the head it held:
# README, what does not survive a crash)
ID_PRINTER = """import itertools, os, sys, time
tag = sys.argv[1].encode()
for i in itertools.count():
    os.write(1, b"%s %d\\n" % (tag, i))
    time.sleep(0.01)
"""

# not dumpable: a same-uid pidfd_getfd is refused by the kernel (ptrace rights), root's is not
ID_UNDUMPABLE = """import ctypes, itertools, time
assert ctypes.CDLL(None).prctl(4, 0, 0, 0, 0) == 0      # PR_SET_DUMPABLE
for i in itertools.count():
    print("d", i, flush=True)
    time.sleep(0.05)
"""

# a process that is not a service: it leads its own session and records signals
ID_STRANGER = """import os, signal, sys, time
for s in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR1, signal.SIGCONT):
    signal.signal(s, lambda n, f: open(sys.argv[1], "a").write("got %d\\n" % n))
open(sys.argv[1] + ".ready", "w").close()
while True:
    time.sleep(1)
"""

ID_CONFIG = """
[respawn]
watch_self = false
socket = {dir}/s.sock
logfile = {dir}/sup.log

[program:quiet]
command = sleep 1000
startsecs = 0.2
stopwaitsecs = 2

[program:printer]
command = {py} -u {dir}/printer.py n
startsecs = 0.2
stopwaitsecs = 2

[program:logger]
command = {py} -u {dir}/printer.py log
stdout_logfile = {dir}/svc.log
startsecs = 0.2
stopwaitsecs = 2
"""


def id_numbers(text, prefix):
    """The counters of lines 'PREFIXK' in a text, in order."""
    return [int(m) for m in re.findall(r"^%s(\d+)$" % re.escape(prefix), text, re.M)]


def copies(marker):
    """Session leaders carrying this service marker: the running copies of a service."""
    found = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        pid = int(name)
        fields = proc_stat(pid)
        if not fields or fields[0] == "Z" or int(fields[3]) != pid:
            continue
        try:
            with open("/proc/%d/environ" % pid, "rb") as f:
                env = f.read().split(b"\0")
        except OSError:
            continue
        if ("RESPAWN_SERVICE=" + marker).encode() in env:
            found.append(pid)
    return found


class IdSup:
    """A supervisor of issue 11's tests, as root or as nobody, in a folder of its
    own.  Services outlive a killed supervisor now: the cleanup stops every
    supervisor it saw, then kills every service group it recorded (by PID and
    start time, never a reused PID)."""

    def __init__(self, test, config=ID_CONFIG, uid=None, env=None):
        self.test, self.uid = test, uid
        self.dir = tempfile.mkdtemp(prefix="respawn-id-")
        test.addCleanup(shutil.rmtree, self.dir, True)
        self.py = PY if uid is None else NOBODY_PY
        if uid is not None:
            os.chown(self.dir, uid, uid)
        self.config = self.path("c.ini")
        self.write("c.ini", config)
        self.write("printer.py", ID_PRINTER)
        self.write("undumpable.py", ID_UNDUMPABLE)
        self.env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LANG": "C.UTF-8"}
        self.env.update(env or {})
        self.seen_sups, self.seen_svcs = {}, {}     # pid -> start time
        self.out = open(self.path("out.txt"), "ab")
        self.err = open(self.path("err.txt"), "ab")
        self.proc = None
        self.script = SCRIPT
        test.addCleanup(self.cleanup)

    def path(self, *parts):
        return os.path.join(self.dir, *parts)

    def write(self, name, text):
        # whole and owned before it has its name: a service that reads and removes
        # it (notify.py's n.msg) may do so at once (the chown after it failed in CI)
        path = self.path(name)
        with open(path + ".new", "w") as f:
            f.write(textwrap.dedent(text).lstrip().replace("{dir}", self.dir).replace("{py}", self.py))
        if self.uid is not None:
            os.chown(path + ".new", self.uid, self.uid)
        os.replace(path + ".new", path)
        return path

    def id_file(self, ext):
        name, digest = respawn.config_identity(self.config)
        folder = "/run/respawn" if self.uid is None else "/tmp/respawn-%d" % self.uid
        return os.path.join(folder, "%s-%s.%s" % (name, digest[:16], ext))

    def marker(self, name):
        return "%s/%s" % (respawn.marker_prefix(self.config), name)

    def _demote(self):
        if self.uid is not None:
            os.setgroups([])
            os.setgid(self.uid)
            os.setuid(self.uid)

    def popen(self, args, env=None, script=True, **kw):
        script = self.script if script is True else script
        kw.setdefault("cwd", self.dir)
        return subprocess.Popen(respawn_argv(script, args, self.py) if script else [self.py] + list(args),
                                env=dict(self.env, **(env or {})), preexec_fn=self._demote, **kw)

    def run(self, *args, env=None, **kw):
        p = self.popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, **kw)
        out, err = p.communicate(timeout=60)
        self.record()
        return subprocess.CompletedProcess(p.args, p.returncode, out.decode(), err.decode())

    def start(self, wait=True):
        self.proc = self.popen(["-c", self.config, "run"], stdout=self.out, stderr=self.err,
                               start_new_session=True)
        self.seen_sups[self.proc.pid] = None
        if wait:
            wait_for(self.try_status, what="the supervisor's socket")
        return self

    def sock(self):
        """Where the running supervisor listens, from its lock file (as a client finds it)."""
        try:
            with open(self.id_file("lock")) as f:
                return f.read().split("\n")[1]
        except (OSError, IndexError):
            return self.path("s.sock")

    def try_status(self):
        if self.proc is not None and self.proc.poll() is not None and self.proc.returncode != 0:
            raise AssertionError("the supervisor exited with %s:\n%s" % (self.proc.returncode, self.log()))
        try:
            return self.status()
        except (OSError, ValueError, AssertionError, StopIteration, respawn.NoSupervisor):
            return None

    def status(self):
        reply = next(respawn.request(self.sock(), "status", timeout=10))
        if "services" not in reply:
            raise AssertionError("no status: %r" % (reply,))
        self.seen_sups.setdefault(reply["supervisor"]["pid"], None)
        self.record(reply)
        return reply

    def record(self, reply=None):
        pids = [s["pid"] for s in reply["services"] if s["pid"]] if reply else []
        try:
            with open(self.id_file("state")) as f:
                pids += [e["pid"] for e in json.load(f)["services"] if e.get("pid")]
        except (OSError, ValueError, KeyError):
            pass
        for pid in pids:
            if pid not in self.seen_svcs:
                stat = proc_stat(pid)
                if stat:
                    self.seen_svcs[pid] = stat[19]
        try:
            with open(self.id_file("lock")) as f:
                self.seen_sups.setdefault(int(f.read().split("\n")[0]), None)
        except (OSError, ValueError):
            pass

    def svc(self, name):
        return next(s for s in self.status()["services"] if s["name"] == name)

    def wait_state(self, name, *states):
        return wait_for(lambda: (lambda s: s if s["state"] in states else None)(self.svc(name)),
                        what="%s to be %s" % (name, "/".join(states)))

    def log(self):
        return read_text(self.path("sup.log")) if os.path.exists(self.path("sup.log")) else ""

    def supervisor_pid(self):
        with open(self.id_file("lock")) as f:
            return int(f.read().split("\n")[0])

    def crash(self):
        """SIGKILL the supervisor: its services go on.  Killed while it waits in epoll:
        between its read of a pipe and its write of what it read it holds those bytes
        alone, and a kill there loses them (README: what does not survive); that window
        is not what these tests measure.  So it is stopped first, and killed only if it
        stopped inside epoll_wait (else it goes on, and is stopped again).  There it holds
        only the head of a prefixed line read without its newline, lost too (and no
        stopping point avoids it: the writer may be stopped mid-line); the services
        whose lines are counted write each line in one write (ID_PRINTER): it holds none."""
        pid = self.supervisor_pid()
        epoll = {"x86_64": {"232", "281", "441"}, "aarch64": {"22", "441"}}.get(os.uname().machine)
        deadline = time.monotonic() + DEADLINE
        while epoll is not None and time.monotonic() < deadline:
            os.kill(pid, signal.SIGSTOP)
            wait_for(lambda: (proc_stat(pid) or ["T"])[0] in ("T", "t"), what="the supervisor to stop")
            try:
                with open("/proc/%d/syscall" % pid) as f:
                    if f.read().split()[0] in epoll:
                        break
            except (OSError, IndexError):
                break
            os.kill(pid, signal.SIGCONT)
            time.sleep(0.001)         # let it run to its next wait
        os.kill(pid, signal.SIGKILL)
        if self.proc is not None and self.proc.pid == pid:
            self.proc.wait(DEADLINE)
        wait_for(lambda: not pid_alive(pid), what="the supervisor to die")
        return pid

    def cleanup(self):
        self.record()
        for pid in list(self.seen_sups):
            if pid_alive(pid) and b"respawn" in b"".join(cmdline(pid)):
                stop_daemon(pid, ())
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
        if self.proc is not None:
            self.proc.wait(10)
        for pid, started in self.seen_svcs.items():
            stat = proc_stat(pid)
            if stat and stat[19] == started:
                kill_group(pid)
        self.out.close()
        self.err.close()


class IdentityCases:
    """Run as root and as nobody, under both child watchers (the subclasses)."""

    uid = None
    env = {}

    def make(self, config=ID_CONFIG, env=None):
        if self.uid is not None and not _others_can_run(NOBODY_PY):
            self.skipTest("no interpreter uid %d can run (%s)" % (NOBODY, NOBODY_PY))
        if self.uid is not None and stat.S_IMODE(os.stat("/tmp").st_mode) & 0o001 == 0:
            # what this issue fixes: an older respawn.py with `socket = /tmp/x.sock`, run
            # as root, left /tmp 0700; nobody then cannot reach its folder /tmp/respawn-UID
            self.skipTest("/tmp is %o: uid %d cannot enter it" % (stat.S_IMODE(os.stat("/tmp").st_mode), NOBODY))
        return IdSup(self, config, self.uid, dict(self.env, **(env or {})))

    def assert_nothing_left(self, sup):
        for ext in ("lock", "state", "state.tmp"):
            self.assertFalse(os.path.exists(sup.id_file(ext)), "%s left behind" % ext)
        self.assertFalse(os.path.exists(sup.sock()), "the socket left behind")

    # -- one supervisor per config ----------------------------------------

    def test_one_supervisor_whatever_the_environment(self):
        sup = self.make("""
            [respawn]
            watch_self = false
            logfile = {dir}/sup.log
            [program:x]
            command = sleep 1000
            startsecs = 0.2
            """)
        for d in ("xdg1", "xdg2", "cwd", "real"):
            os.mkdir(sup.path(d), 0o700)
            if self.uid is not None:
                os.chown(sup.path(d), self.uid, self.uid)
        os.symlink(sup.dir, sup.path("link"))
        p = sup.run("-c", sup.config, "run", "--daemon", env={"XDG_RUNTIME_DIR": sup.path("xdg1")})
        self.assertEqual(p.returncode, 0, p.stdout + p.stderr)
        pid = int(re.match(r"^started \(pid (\d+)\)", p.stdout).group(1))
        sock = sup.sock()
        self.assertTrue(sock.startswith(sup.path("xdg1", "respawn") + "/"), sock)
        sup.wait_state("x", "RUNNING")
        already = "already running (pid %d)\n" % pid
        # a login's runtime folder, none (cron, systemd), a symlinked path, another cwd
        for env, config, cwd in (({"XDG_RUNTIME_DIR": sup.path("xdg2")}, sup.config, sup.dir),
                                 ({}, sup.config, "/"),
                                 ({}, sup.path("link", "c.ini"), sup.dir),
                                 ({"XDG_RUNTIME_DIR": sup.path("xdg2")}, "../c.ini", sup.path("cwd"))):
            p = sup.run("-c", config, "run", "--daemon", env=env, cwd=cwd)
            self.assertEqual((p.returncode, p.stdout, p.stderr), (0, already, ""), (env, config))
            # and a client there finds it
            p = sup.run("-c", config, "status", "--json", env=env, cwd=cwd)
            self.assertEqual(p.returncode, 0, p.stdout + p.stderr)
            self.assertEqual(json.loads(p.stdout)["supervisor"]["pid"], pid)
            # through its lock, without reading the config's sections (issue 15)
            p = sup.run("-c", TRAPPED_CLIENT, sup.script, "-c", config, "status", "--json",
                        env=env, cwd=cwd, script=False)
            self.assertEqual((p.returncode, p.stderr), (0, ""), (env, config))
            self.assertEqual(json.loads(p.stdout)["supervisor"]["pid"], pid)
        # an edit of socket = that was not reloaded hides nothing
        with open(sup.config, "a") as f:
            f.write("")
        text = read_text(sup.config).replace("[respawn]\n", "[respawn]\nsocket = %s\n" % sup.path("new.sock"))
        sup.write("c.ini", text)
        p = sup.run("-c", sup.config, "run", "--daemon")
        self.assertEqual((p.returncode, p.stdout, p.stderr), (0, already, ""))
        p = sup.run("-c", sup.config, "status", "--json")
        self.assertEqual(json.loads(p.stdout)["supervisor"]["pid"], pid)
        p = sup.run("-c", TRAPPED_CLIENT, sup.script, "-c", sup.config, "status", "--json", script=False)
        self.assertEqual(json.loads(p.stdout)["supervisor"]["pid"], pid, p.stderr)
        self.assertEqual(len(copies(sup.marker("x"))), 1)
        self.assertEqual(sup.svc("x")["restarts"], 0)
        self.assertEqual(sup.run("-c", sup.config, "shutdown").stdout, "stopped\n")
        wait_for(lambda: not pid_alive(pid), what="the supervisor to exit")
        self.assertEqual(copies(sup.marker("x")), [])
        self.assertFalse(os.path.exists(sock), "the socket left behind")
        self.assertFalse(os.path.exists(sup.id_file("lock")))
        self.assertFalse(os.path.exists(sup.id_file("state")))

    # -- services outlive the supervisor, and are adopted -------------------

    def test_sigkill_then_adoption_loses_and_duplicates_nothing(self):
        sup = self.make(ID_CONFIG + """
            [program:locked]
            command = {py} -u {dir}/undumpable.py
            startsecs = 0.2
            stopwaitsecs = 2
            """)
        sup.start()
        names = ("quiet", "printer", "logger", "locked")
        before = {n: sup.wait_state(n, "RUNNING")["pid"] for n in names}
        wait_for(lambda: len(id_numbers(read_text(sup.path("out.txt")), "printer | n ")) > 30
                 and len(id_numbers(read_text(sup.path("svc.log")), "log ")) > 30
                 and "locked | d 1\n" in read_text(sup.path("out.txt")), what="output")
        sup.crash()
        cut = len(id_numbers(read_text(sup.path("out.txt")), "printer | n "))
        holds(lambda: all(pid_alive(p) for p in before.values()), 1.0,
              "a service died with its supervisor")
        # the next run adopts them: same PIDs, the output goes on where it stopped
        sup.start()
        after = {n: sup.svc(n) for n in names}
        self.assertEqual({n: s["pid"] for n, s in after.items()}, before)
        self.assertTrue(all(s["adopted"] and s["state"] == "RUNNING" for s in after.values()), after)
        p = sup.run("-c", sup.config, "status")
        self.assertRegex(p.stdout, r"printer\s+RUNNING\s+.*pid %d, uptime \S+, adopted" % before["printer"])
        wait_for(lambda: len(id_numbers(read_text(sup.path("out.txt")), "printer | n ")) > cut + 50
                 and len(id_numbers(read_text(sup.path("svc.log")), "log ")) > cut + 50,
                 what="output after the adoption")
        log = sup.log()
        for n in ("quiet", "printer", "logger"):
            self.assertIn("%s: adopted pid %d" % (n, before[n]), log)
        if self.uid is None:
            # root may take any process's fds
            self.assertIn("locked: adopted pid %d and its output" % before["locked"], log)
        else:
            # the fallback: adopted, watched, not started twice; its output waits in its pipe
            self.assertIn("locked: adopted pid %d without its output (pidfd_getfd refused: "
                          "Operation not permitted)" % before["locked"], log)
            p = sup.run("-c", sup.config, "restart", "locked")
            self.assertEqual(p.returncode, 0, p.stdout + p.stderr)
            wait_for(lambda: read_text(sup.path("out.txt")).count("locked | d 1\n") == 2,
                     what="a restart to reconnect its output")
        for n in names:
            self.assertEqual(len(copies(sup.marker(n))), 1, n)
        # an adopted process's exit is seen (not our child: status unknown) and handled
        os.kill(before["quiet"], signal.SIGKILL)
        again = wait_for(lambda: (lambda s: s if s["pid"] not in (None, before["quiet"])
                                  and s["state"] == "RUNNING" else None)(sup.svc("quiet")),
                         what="quiet to be restarted")
        self.assertIsNone(again["exitstatus"])
        self.assertFalse(again["adopted"])
        self.assertRegex(again["reason"], r"^exit status unknown( after \S+)?$")
        self.assertIn("quiet: adopted pid %d exited (not our child: its exit status is unknown)"
                      % before["quiet"], sup.log())
        self.assertEqual(sup.run("-c", sup.config, "shutdown").stdout, "stopped\n")
        self.assertEqual(sup.proc.wait(DEADLINE), 0)
        # every numbered line once, across the old supervisor's output and the new one's
        nums = id_numbers(read_text(sup.path("out.txt")), "printer | n ")
        self.assertEqual(nums, list(range(len(nums))))
        logged = id_numbers(read_text(sup.path("svc.log")), "log ")
        self.assertEqual(logged, list(range(len(logged))))
        self.assertGreater(len(logged), cut + 50)
        self.assertNotIn("internal error", sup.log())
        self.assert_nothing_left(sup)

    def test_cron_keep_alive_after_a_kill_gives_one_supervisor(self):
        sup = self.make()
        sup.start()
        before = {n: sup.wait_state(n, "RUNNING")["pid"] for n in ("quiet", "printer", "logger")}
        old = sup.crash()
        procs = [sup.popen(["-c", sup.config, "run", "--daemon"], stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE) for _ in range(3)]
        outs = []
        for p in procs:
            out, err = p.communicate(timeout=60)
            self.assertEqual((p.returncode, err), (0, b""), out)
            outs.append(out.decode())
        sup.record()
        started = [o for o in outs if o.startswith("started")]
        self.assertEqual(len(started), 1, outs)
        pid = int(re.match(r"started \(pid (\d+)\)", started[0]).group(1))
        self.assertNotEqual(pid, old)
        wait_for(lambda: supervisors_of(sup.config) == [pid], what="exactly one supervisor")
        st = sup.status()
        self.assertEqual({s["name"]: s["pid"] for s in st["services"]}, before)
        for n in before:
            self.assertEqual(copies(sup.marker(n)), [before[n]])

    def test_a_service_killed_while_no_supervisor_ran_is_restarted(self):
        sup = self.make()
        sup.start()
        before = {n: sup.wait_state(n, "RUNNING")["pid"] for n in ("quiet", "printer", "logger")}
        sup.crash()
        kill_group(before["quiet"])
        wait_for(lambda: not pid_alive(before["quiet"]), what="quiet to die")
        sup.start()
        q = sup.wait_state("quiet", "RUNNING")
        self.assertNotEqual(q["pid"], before["quiet"])
        self.assertFalse(q["adopted"])
        self.assertEqual(q["restarts"], 1)
        self.assertRegex(q["reason"], r"^exited while no supervisor ran \(exit status unknown\)( after \S+)?$")
        self.assertIn("quiet: pid %d exited while no supervisor ran" % before["quiet"], sup.log())
        self.assertEqual(sup.svc("printer")["pid"], before["printer"])
        self.assertEqual(copies(sup.marker("quiet")), [q["pid"]])

    def stranger(self, sup):
        """A process of the same user that is no service of ours: (pid, signals file)."""
        sup.write("stranger.py", ID_STRANGER)
        record = sup.path("stranger.signals")
        p = sup.popen([sup.path("stranger.py"), record], script=None, start_new_session=True)
        self.addCleanup(lambda: (p.kill(), p.wait(10)))
        wait_for(lambda: os.path.exists(record + ".ready"), what="the stranger to start")
        return p, record

    def test_a_reused_pid_is_never_adopted_or_signalled(self):
        sup = self.make()
        sup.start()
        old = sup.wait_state("quiet", "RUNNING")["pid"]
        sup.crash()
        kill_group(old)
        wait_for(lambda: not pid_alive(old), what="quiet to die")
        # its PID now belongs to another process: the state names that PID, with the
        # start time of the process that had it before
        stranger, record = self.stranger(sup)
        with open(sup.id_file("state")) as f:
            state = json.load(f)
        entry = next(e for e in state["services"] if e["name"] == "quiet")
        self.assertNotEqual(int(proc_stat(stranger.pid)[19]), entry["starttime"])
        entry["pid"] = stranger.pid
        with open(sup.id_file("state"), "w") as f:
            json.dump(state, f)
        sup.start()
        q = sup.wait_state("quiet", "RUNNING")
        self.assertNotIn(q["pid"], (old, stranger.pid))
        self.assertFalse(q["adopted"])
        self.assertEqual(sup.run("-c", sup.config, "stop", "quiet").returncode, 0)
        self.assertEqual(sup.run("-c", sup.config, "shutdown").stdout, "stopped\n")
        self.assertTrue(pid_alive(stranger.pid))
        self.assertEqual(stranger.poll(), None)
        self.assertFalse(os.path.exists(record), read_text(record) if os.path.exists(record) else "")

    def refused(self, sup, spoil, left=("quiet", "logger")):
        """Crash with quiet running and printer killed meanwhile, spoil the state file,
        run again: the one line, and what was started."""
        sup.start()
        before = {n: sup.wait_state(n, "RUNNING")["pid"] for n in ("quiet", "printer", "logger")}
        sup.crash()
        kill_group(before["printer"])
        wait_for(lambda: not pid_alive(before["printer"]), what="printer to die")
        before.update(spoil(sup.id_file("state")) or {})
        sup.start()
        lines = [l for l in sup.log().splitlines() if "state file" in l]
        self.assertEqual(len(lines), 1, lines)
        self.assertRegex(lines[0], r" ERROR state file %s refused: .*; starting only services not "
                         r"running \(left alone: " % re.escape(sup.id_file("state")))
        # printer is proven not running: started; quiet and logger still run: left alone
        if "printer" not in left:
            p = sup.wait_state("printer", "RUNNING")
            self.assertNotEqual(p["pid"], before["printer"])
        for n in left:
            s = sup.svc(n)
            self.assertEqual((s["state"], s["pid"]), ("STOPPED", None))
            self.assertEqual(s["reason"], "not started: pid %d may still run it (state file refused)"
                             % before[n])
            self.assertTrue(pid_alive(before[n]))
            if n != "printer":
                self.assertEqual(copies(sup.marker(n)), [before[n]])
        self.assertNotIn("Traceback", read_text(sup.path("err.txt")))
        # once the process left alone is gone, the service starts
        kill_group(before["quiet"])
        q = wait_for(lambda: (lambda s: s if s["state"] == "RUNNING" else None)(sup.svc("quiet")),
                     what="quiet to start once its old process is gone")
        self.assertEqual(copies(sup.marker("quiet")), [q["pid"]])
        return lines[0], before

    def test_a_truncated_state_file_is_refused_in_one_line(self):
        def truncate(path):
            with open(path, "rb") as f:
                data = f.read()
            with open(path, "wb") as f:
                f.write(data[:len(data) // 2])
        line, _ = self.refused(self.make(), truncate)
        self.assertIn("refused: corrupt or truncated", line)

    def test_a_state_file_of_another_version_is_refused_in_one_line(self):
        def future(path):
            with open(path) as f:
                state = json.load(f)
            state.update(respawn_state=99, version="9.0.0")
            with open(path, "w") as f:
                json.dump(state, f)
        line, _ = self.refused(self.make(), future)
        self.assertIn("refused: format 99 from version 9.0.0; this version %s reads format 1"
                      % respawn.__version__, line)

    def test_a_state_file_naming_a_process_not_ours_is_refused(self):
        sup = self.make()
        stranger, record = self.stranger(sup)

        def foreign(path):
            with open(path) as f:
                state = json.load(f)
            entry = next(e for e in state["services"] if e["name"] == "printer")
            entry.update(pid=stranger.pid, starttime=int(proc_stat(stranger.pid)[19]))
            with open(path, "w") as f:
                json.dump(state, f)
            return {"printer": stranger.pid}
        # printer is not started beside a process the state says runs it: it may
        # (a service that cleared its environment looks the same)
        line, _ = self.refused(sup, foreign, left=("quiet", "logger", "printer"))
        self.assertIn("it names a process that is not ours: pid %d of printer has no RESPAWN_SERVICE "
                      "in its environment" % stranger.pid, line)
        self.assertIsNone(stranger.poll())
        self.assertFalse(os.path.exists(record), "the stranger was signalled")
        self.assertEqual(copies(sup.marker("printer")), [])
        stranger.kill()
        p = wait_for(lambda: (lambda s: s if s["state"] == "RUNNING" else None)(sup.svc("printer")),
                     what="printer to start once the process is gone")
        self.assertEqual(copies(sup.marker("printer")), [p["pid"]])

    def test_a_reexec_keeps_adopted_services_adopted(self):
        sup = self.make()
        sup.start()
        before = {n: sup.wait_state(n, "RUNNING")["pid"] for n in ("quiet", "printer", "logger")}
        sup.crash()
        sup.start()
        wait_for(lambda: all(s["adopted"] for s in sup.status()["services"]), what="the adoption")
        p = sup.run("-c", sup.config, "reexec")
        self.assertEqual(p.returncode, 0, p.stdout + p.stderr)
        st = sup.status()
        self.assertEqual(st["supervisor"]["reexecs"], 1)
        self.assertEqual({s["name"]: (s["pid"], s["adopted"]) for s in st["services"]},
                         {n: (pid, True) for n, pid in before.items()})
        cut = len(id_numbers(read_text(sup.path("out.txt")), "printer | n "))
        wait_for(lambda: len(id_numbers(read_text(sup.path("out.txt")), "printer | n ")) > cut + 20,
                 what="output after the re-exec")
        # its exits are still seen, and the state file follows
        os.kill(before["printer"], signal.SIGKILL)
        p = wait_for(lambda: (lambda s: s if s["pid"] not in (None, before["printer"])
                              and s["state"] == "RUNNING" else None)(sup.svc("printer")),
                     what="printer to be restarted")

        def state_pid():
            with open(sup.id_file("state")) as f:
                return next(e for e in json.load(f)["services"] if e["name"] == "printer").get("pid")
        wait_for(lambda: state_pid() == p["pid"], what="the state file to name the new pid")
        self.assertEqual(sup.run("-c", sup.config, "shutdown").stdout, "stopped\n")
        self.assertEqual(sup.proc.wait(DEADLINE), 0)
        nums = id_numbers(read_text(sup.path("out.txt")), "printer | n ")
        first = nums[:nums.index(0, 1)] if 0 in nums[1:] else nums     # the restarted copy counts anew
        self.assertEqual(first, list(range(len(first))))
        self.assert_nothing_left(sup)

    def test_an_operator_stop_is_kept_across_a_crash(self):
        sup = self.make()
        sup.start()
        sup.wait_state("printer", "RUNNING")
        self.assertEqual(sup.run("-c", sup.config, "stop", "printer").returncode, 0)
        quiet = sup.wait_state("quiet", "RUNNING")["pid"]
        sup.crash()
        sup.start()
        self.assertEqual(sup.svc("quiet")["pid"], quiet)
        holds(lambda: sup.svc("printer")["state"] == "STOPPED", 0.5, "printer was started again")
        self.assertEqual(copies(sup.marker("printer")), [])
        self.assertEqual(sup.run("-c", sup.config, "start", "printer").returncode, 0)
        self.assertEqual(len(copies(sup.marker("printer"))), 1)

    def test_an_operator_start_is_kept_across_a_crash(self):
        sup = self.make(ID_CONFIG + """
            [program:manual]
            command = sleep 1000
            autostart = false
            startsecs = 0.2
            stopwaitsecs = 2
            """)
        sup.start()
        self.assertEqual(sup.run("-c", sup.config, "start", "manual").returncode, 0)
        pid = sup.wait_state("manual", "RUNNING")["pid"]
        sup.crash()
        sup.start()
        self.assertEqual((sup.svc("manual")["pid"], sup.svc("manual")["adopted"]), (pid, True))
        os.kill(pid, signal.SIGKILL)           # still wanted: its policy restarts it
        wait_for(lambda: (lambda s: s["pid"] not in (None, pid) and s["state"] == "RUNNING")(
            sup.svc("manual")), what="manual to be restarted")

    def test_a_notify_service_is_heard_again_after_adoption(self):
        sup = self.make("""
            [respawn]
            watch_self = false
            socket = {dir}/s.sock
            logfile = {dir}/sup.log
            [program:n]
            command = {py} {dir}/notify.py n {dir} --ready-now --ping
            ready = notify
            watchdog = 1
            stopwaitsecs = 2
            """)
        # like sd_notify(3), it ignores a send that fails (no supervisor listens for a while)
        tolerant = NOTIFY_PY.replace("    s.sendto(msg.encode(), addr)\n", "    try:\n        s.sendto("
                                     "msg.encode(), addr)\n    except OSError:\n        pass\n")
        self.assertNotEqual(tolerant, NOTIFY_PY)
        sup.write("notify.py", tolerant)
        sup.write("n.ping", "")
        sup.start()
        pid = sup.wait_state("n", "RUNNING")["pid"]
        sup.crash()
        sup.start()
        self.assertTrue(sup.svc("n")["adopted"], sup.log())
        # its WATCHDOG=1 pings reach the new supervisor: no watchdog restart
        holds(lambda: sup.svc("n")["pid"] == pid, 2.5, "the adopted service was restarted")
        sup.write("n.msg", "STATUS=still here")
        wait_for(lambda: sup.svc("n")["status"] == "still here", what="STATUS= heard")
        self.assertNotIn("watchdog", sup.log())

    def test_two_crashes_two_adoptions(self):
        sup = self.make()
        sup.start()
        before = {n: sup.wait_state(n, "RUNNING")["pid"] for n in ("quiet", "printer", "logger")}
        for _ in range(2):
            sup.crash()
            cut = len(id_numbers(read_text(sup.path("out.txt")), "printer | n "))
            sup.start()
            st = sup.status()
            self.assertEqual({s["name"]: (s["pid"], s["adopted"]) for s in st["services"]},
                             {n: (p, True) for n, p in before.items()})
            wait_for(lambda: len(id_numbers(read_text(sup.path("out.txt")), "printer | n ")) > cut + 20,
                     what="output after the adoption")
        self.assertEqual(sup.run("-c", sup.config, "shutdown").stdout, "stopped\n")
        nums = id_numbers(read_text(sup.path("out.txt")), "printer | n ")
        self.assertEqual(nums, list(range(len(nums))))

    def test_a_crash_loses_only_the_head_of_a_line_begun(self):
        # README, what does not survive: the head of a prefixed line read without its
        # newline lives in the dead supervisor alone; its tail comes as a line of its own
        sup = self.make("""
            [respawn]
            watch_self = false
            socket = {dir}/s.sock
            logfile = {dir}/sup.log
            [program:half]
            command = {py} {dir}/half.py {dir}
            startsecs = 0
            stopwaitsecs = 2
            """)
        sup.write("half.py", """
            import fcntl, os, struct, sys, termios, time
            d = sys.argv[1]
            os.write(1, b"before\\n")
            os.write(1, b"head")
            # read by the supervisor: nothing left in the pipe (FIONREAD on our end)
            while struct.unpack("i", fcntl.ioctl(1, termios.FIONREAD, b"    "))[0]:
                time.sleep(0.01)
            open(d + "/read", "w").close()
            while not os.path.exists(d + "/go"):
                time.sleep(0.01)
            os.write(1, b"tail\\n")
            os.write(1, b"after\\n")
            time.sleep(1000)
            """)
        sup.start()
        pid = sup.wait_state("half", "RUNNING")["pid"]

        def in_state():
            with open(sup.id_file("state")) as f:
                return pid in [e.get("pid") for e in json.load(f)["services"]]
        wait_for(lambda: os.path.exists(sup.path("read")) and in_state(), what="the head to be read")
        sup.crash()
        sup.start()
        self.assertEqual((sup.svc("half")["pid"], sup.svc("half")["adopted"]), (pid, True))
        sup.write("go", "")
        wait_for(lambda: "half | after\n" in read_text(sup.path("out.txt")), what="the rest")
        self.assertEqual(sup.run("-c", sup.config, "shutdown").stdout, "stopped\n")
        self.assertEqual([l for l in read_text(sup.path("out.txt")).splitlines() if l.startswith("half")],
                         ["half | before", "half | tail", "half | after"])

    def test_a_service_gone_from_the_config_is_left_running(self):
        sup = self.make()
        sup.start()
        pid = sup.wait_state("printer", "RUNNING")["pid"]
        sup.crash()
        sup.write("c.ini", read_text(sup.config).replace("[program:printer]", "[program:printer2]"))
        sup.start()
        wait_for(lambda: "pid %d of printer is left running: the config has no such service now" % pid
                 in sup.log(), what="the warning")
        self.assertTrue(pid_alive(pid))
        self.assertNotIn("printer", [s["name"] for s in sup.status()["services"]])

    def test_a_state_file_that_cannot_be_written_is_said_once_and_again_when_it_can(self):
        sup = self.make()
        sup.start()
        sup.wait_state("quiet", "RUNNING")
        blocker = sup.id_file("state.tmp")
        os.mkdir(blocker)
        self.addCleanup(lambda: os.path.isdir(blocker) and os.rmdir(blocker))
        self.assertEqual(sup.run("-c", sup.config, "stop", "quiet").returncode, 0)
        self.assertEqual(sup.run("-c", sup.config, "restart", "printer").returncode, 0)
        wait_for(lambda: "cannot write the state file %s: Is a directory" % sup.id_file("state") in sup.log(),
                 what="the error")
        self.assertEqual(sup.log().count("cannot write the state file"), 1)
        os.rmdir(blocker)
        self.assertEqual(sup.run("-c", sup.config, "start", "quiet").returncode, 0)
        wait_for(lambda: "the state file %s is written again" % sup.id_file("state") in sup.log(),
                 what="the recovery")
        pid = sup.svc("quiet")["pid"]
        with open(sup.id_file("state")) as f:
            self.assertIn(pid, [e.get("pid") for e in json.load(f)["services"]])

    def test_a_bug_while_taking_over_starts_no_second_copy(self):
        sup = self.make()
        sup.start()
        before = {n: sup.wait_state(n, "RUNNING")["pid"] for n in ("quiet", "printer", "logger")}
        sup.crash()
        buggy = patched(read_text(SCRIPT), "    pid = e[\"pid\"]\n    try:\n        pidfd = pidfd_open(pid)\n",
                        "    pid = e[\"pid\"]\n    if e[\"name\"] == \"printer\":\n        raise KeyError(\"injected\")\n"
                        "    try:\n        pidfd = pidfd_open(pid)\n")
        sup.script = sup.write("buggy.py", buggy)
        sup.start()
        log = sup.log()
        self.assertEqual(len([l for l in log.splitlines() if "internal error at" in l]), 1, log)
        self.assertIn("state file %s refused: taking it over failed; starting only services not running "
                      "(left alone: " % sup.id_file("state"), log)
        for n, pid in before.items():
            self.assertEqual(copies(sup.marker(n)), [pid], n)
        self.assertEqual(sup.svc("printer")["reason"],
                         "not started: pid %d may still run it (state file refused)" % before["printer"])

    # -- files --------------------------------------------------------------

    def test_socket_folders_created_0700_existing_keep_their_mode(self):
        sup = self.make()
        shared = sup.path("shared")
        os.mkdir(shared)
        os.chmod(shared, 0o1777)            # like /tmp
        text = read_text(sup.config).replace("socket = %s" % sup.path("s.sock"),
                                             "socket = %s/s.sock" % shared)
        sup.write("c.ini", text)
        sup.start()
        self.assertEqual(stat.S_IMODE(os.stat(shared).st_mode), 0o1777)
        self.assertEqual(stat.S_IMODE(os.stat(shared + "/s.sock").st_mode), 0o600)
        self.assertEqual(stat.S_IMODE(os.stat(os.path.dirname(sup.id_file("lock"))).st_mode), 0o700)
        self.assertEqual(sup.run("-c", sup.config, "shutdown").stdout, "stopped\n")
        self.assertEqual(sup.proc.wait(DEADLINE), 0)
        self.assertEqual(stat.S_IMODE(os.stat(shared).st_mode), 0o1777)
        self.assertEqual(os.listdir(shared), [])
        self.assert_nothing_left(sup)
        # folders it creates, parents too, are 0700; one that exists, 0755, stays so
        os.mkdir(sup.path("open"), 0o755)
        os.chmod(sup.path("open"), 0o755)
        if self.uid is not None:
            os.chown(sup.path("open"), self.uid, self.uid)
        sock = sup.path("open", "a", "b", "s.sock")
        sup.write("c.ini", text.replace("socket = %s/s.sock" % shared, "socket = %s" % sock))
        sup.out.close()
        sup.err.close()
        sup.out, sup.err = open(sup.path("out.txt"), "ab"), open(sup.path("err.txt"), "ab")
        sup.start()
        self.assertEqual(sup.sock(), sock)
        self.assertEqual(stat.S_IMODE(os.stat(sup.path("open")).st_mode), 0o755)
        for d in (sup.path("open", "a"), sup.path("open", "a", "b")):
            self.assertEqual(stat.S_IMODE(os.stat(d).st_mode), 0o700, d)
        self.assertEqual(sup.run("-c", sup.config, "shutdown").stdout, "stopped\n")
        self.assertEqual(sup.proc.wait(DEADLINE), 0)
        self.assert_nothing_left(sup)


class TestIdentityRootPidfd(IdentityCases, unittest.TestCase):
    pass


class TestIdentityRootSigchld(IdentityCases, unittest.TestCase):
    env = {"RESPAWN_NO_PIDFD": "1"}


@unittest.skipUnless(os.geteuid() == 0, "needs root to run the supervisor as nobody (uid %d)" % NOBODY)
class TestIdentityNobodyPidfd(IdentityCases, unittest.TestCase):
    uid = NOBODY


@unittest.skipUnless(os.geteuid() == 0, "needs root to run the supervisor as nobody (uid %d)" % NOBODY)
class TestIdentityNobodySigchld(IdentityCases, unittest.TestCase):
    uid = NOBODY
    env = {"RESPAWN_NO_PIDFD": "1"}


class LoopHost:
    """The loop's narrow interface (call_at, cancel_timer, watch_fd, unwatch_fd) over
    a bare selector and Timers, for parts tested without a supervisor."""

    def __init__(self, test):
        self.selector, self.timers = selectors.DefaultSelector(), respawn.Timers()
        test.addCleanup(self.selector.close)

    def call_at(self, when, callback, *args):
        return self.timers.at(when, callback, *args)

    def cancel_timer(self, entry):
        self.timers.cancel(entry)

    def watch_fd(self, fileobj, events, callback):
        self.selector.register(fileobj, events, callback)

    def unwatch_fd(self, fileobj):
        self.selector.unregister(fileobj)


class TestIdentityParts(unittest.TestCase):
    """The pieces of issue 11 one at a time: folders, the lock, the state file, watching."""

    def folder(self):
        d = tempfile.mkdtemp(prefix="respawn-idp-")
        self.addCleanup(shutil.rmtree, d, True)
        return d

    def test_folders_made_0700_existing_ones_keep_mode_and_owner(self):
        d = self.folder()
        old = os.umask(0o777)            # even a umask that would leave them unusable
        try:
            respawn.make_private_dir(os.path.join(d, "a", "b"))
        finally:
            os.umask(old)
        for sub in ("a", "a/b"):
            self.assertEqual(stat.S_IMODE(os.stat(os.path.join(d, sub)).st_mode), 0o700, sub)
        for mode in (0o755, 0o1777, 0o770):
            os.chmod(d, mode)
            respawn.make_private_dir(d)
            self.assertEqual(stat.S_IMODE(os.stat(d).st_mode), mode)
        os.chmod(d, 0o775)
        with self.assertRaisesRegex(OSError, "can be written by other users"):
            respawn.make_private_dir(d, private=True)
        os.chmod(d, 0o700)
        respawn.make_private_dir(d, private=True)
        with open(os.path.join(d, "file"), "w"):
            pass
        with self.assertRaisesRegex(OSError, "is not a folder"):
            respawn.make_private_dir(os.path.join(d, "file"))
        if os.geteuid() == 0:
            theirs = os.path.join(d, "theirs")
            os.mkdir(theirs)
            os.chown(theirs, NOBODY, NOBODY)
            with self.assertRaisesRegex(OSError, "belongs to uid %d" % NOBODY):
                respawn.make_private_dir(theirs)
            self.assertEqual(os.stat(theirs).st_uid, NOBODY)

    def test_identity_is_the_resolved_path_not_the_environment(self):
        d = self.folder()
        path = os.path.join(d, "app.ini")
        write_file(path, "")
        os.symlink(d, os.path.join(d, "link"))
        via_link = os.path.join(d, "link", "app.ini")
        old = os.environ.get("XDG_RUNTIME_DIR")
        self.addCleanup(lambda: os.environ.__setitem__("XDG_RUNTIME_DIR", old) if old is not None
                        else os.environ.pop("XDG_RUNTIME_DIR", None))
        os.environ["XDG_RUNTIME_DIR"] = os.path.join(d, "xdg")
        lock, state = respawn.lock_path(path), respawn.state_path(path)
        self.assertTrue(lock.startswith(respawn.identity_dir() + "/app-"))
        self.assertEqual(respawn.default_socket(path), respawn.default_socket(via_link))
        self.assertTrue(respawn.default_socket(path).startswith(os.path.join(d, "xdg", "respawn", "app-")))
        os.environ.pop("XDG_RUNTIME_DIR")
        self.assertEqual((respawn.lock_path(via_link), respawn.state_path(via_link)), (lock, state))
        self.assertNotEqual(respawn.lock_path(os.path.join(d, "other.ini")), lock)

    def lock_in(self, d):
        path = os.path.join(d, "c.ini")
        write_file(path, "")
        self.addCleanup(lambda: os.path.exists(respawn.lock_path(path)) and os.unlink(respawn.lock_path(path)))
        return path, os.path.join(d, "s.sock")

    def test_lock_held_stale_and_released(self):
        config, sock = self.lock_in(self.folder())
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:
            try:
                respawn.acquire_lock(config, sock)
                os.write(w, b"x")
                time.sleep(1000)
            finally:
                os._exit(1)
        os.close(w)
        self.addCleanup(lambda: (kill_group(pid), os.kill(pid, signal.SIGKILL) if pid_alive(pid) else None))
        self.assertEqual(os.read(r, 1), b"x")
        os.close(r)
        with self.assertRaises(respawn.AlreadyRunning) as caught:
            respawn.acquire_lock(config, sock)
        self.assertEqual(caught.exception.args[0], str(pid))
        self.assertEqual(respawn.running_socket(config), None)      # nothing listens yet
        with open(sock, "w"):
            pass
        self.assertEqual(respawn.running_socket(config), sock)
        # its holder killed: the lock is free at once (the kernel released it)
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        self.assertEqual(respawn.running_socket(config), None)
        fd = respawn.acquire_lock(config, sock)
        with open(respawn.lock_path(config)) as f:
            self.assertEqual(f.read(), "%d\n%s\n" % (os.getpid(), sock))
        respawn.release_lock(fd, respawn.lock_path(config))
        self.assertFalse(os.path.exists(respawn.lock_path(config)))

    def test_a_lock_won_on_a_removed_file_is_taken_again(self):
        """The holder removes its file at exit before letting go: a start that opened
        that file just before must not count its flock (two would run)."""
        config, sock = self.lock_in(self.folder())
        path = respawn.lock_path(config)
        respawn.make_private_dir(os.path.dirname(path))
        stale = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        os.unlink(path)
        real_open, calls = os.open, []

        def open_stale_first(p, *a, **k):
            calls.append(p)
            return stale if p == path and calls.count(path) == 1 else real_open(p, *a, **k)
        from unittest import mock
        with mock.patch.object(respawn.os, "open", open_stale_first):
            fd = respawn.acquire_lock(config, sock)
        self.assertEqual(calls.count(path), 2)
        self.assertEqual(os.fstat(fd).st_ino, os.stat(path).st_ino)
        respawn.release_lock(fd, path)

    def test_a_lock_of_release_1_0_0_beside_the_socket_is_respected(self):
        d = self.folder()
        config, sock = self.lock_in(d)
        legacy = os.open(sock + ".lock", os.O_RDWR | os.O_CREAT, 0o600)
        self.addCleanup(os.close, legacy)
        os.write(legacy, b"4242\n")
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:
            try:
                fcntl_mod = __import__("fcntl")
                fd = os.open(sock + ".lock", os.O_RDWR)
                fcntl_mod.flock(fd, fcntl_mod.LOCK_EX)
                os.write(w, b"x")
                time.sleep(1000)
            finally:
                os._exit(1)
        os.close(w)
        self.assertEqual(os.read(r, 1), b"x")
        os.close(r)
        with self.assertRaises(respawn.AlreadyRunning) as caught:
            respawn.acquire_lock(config, sock)
        self.assertEqual(caught.exception.args[0], "4242")
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        fd = respawn.acquire_lock(config, sock)       # unheld: a leftover, removed
        self.assertFalse(os.path.exists(sock + ".lock"))
        respawn.release_lock(fd, respawn.lock_path(config))

    def state(self, d, **changes):
        config = os.path.join(d, "c.ini")
        write_file(config, "")
        snap = {"respawn_state": 1, "version": respawn.__version__, "boot_id": respawn.boot_id(),
                "config": os.path.realpath(config), "supervisor": 1,
                "services": [{"name": "x", "wanted": True, "restarts": 0, "pid": 123, "starttime": 5,
                              "started": 1.5, "pipes": [["stdout", 11, 99]], "notify": None}]}
        snap.update(changes)
        path = os.path.join(d, "c.state")
        respawn.write_state(path, json.dumps(snap).encode())
        return path, config

    def test_state_file_read_back_or_refused_with_its_reason(self):
        d = self.folder()
        path, config = self.state(d)
        self.assertEqual(stat.S_IMODE(os.stat(path).st_mode), 0o600)
        self.assertFalse(os.path.exists(path + ".tmp"))
        snap, problem = respawn.read_state(path, config)
        self.assertIsNone(problem)
        self.assertEqual(snap["services"][0]["pid"], 123)
        self.assertEqual(respawn.read_state(os.path.join(d, "none"), config), (None, None))
        # before a reboot: nothing of it exists any more, nothing to refuse
        self.assertEqual(respawn.read_state(self.state(d, boot_id="another boot")[0], config), (None, None))
        cases = [
            ({"respawn_state": 2}, "format 2 from version %s" % respawn.__version__),
            ({"config": "/elsewhere.ini"}, "written for another config (/elsewhere.ini)"),
            ({"services": {}}, "no service list"),
            ({"services": [{"name": "x", "pid": True, "starttime": 1, "started": 1, "pipes": []}]},
             "service 'x': bad pid or start time"),
            ({"services": [{"name": "x", "pid": 5, "starttime": 1, "started": 1,
                            "pipes": [["stdin", 3, 4]]}]}, "service 'x': bad pipes"),
            ({"services": [{"pid": 5}]}, "a service entry without a name"),
        ]
        for changes, why in cases:
            with self.subTest(why=why):
                snap, problem = respawn.read_state(self.state(d, **changes)[0], config)
                self.assertIsNone(snap)
                self.assertIn(why, problem)
        for data in (b"", b'{"respawn_state": 1, "serv', b"\xff\xfe", b"[1, 2]"):
            with open(path, "wb") as f:
                f.write(data)
            snap, problem = respawn.read_state(path, config)
            self.assertIsNone(snap)
            self.assertRegex(problem, r"^(corrupt or truncated|not a respawn state file)")

    def test_an_adopted_exit_is_seen_without_pidfds_by_its_start_time(self):
        p = subprocess.Popen(["sleep", "1000"])
        self.addCleanup(lambda: (p.kill(), p.wait()))
        host = LoopHost(self)
        timers = host.timers
        watch = respawn.AdoptedWatch(host)
        seen = []
        from unittest import mock
        with mock.patch.object(respawn, "ADOPTED_POLL", 0.02):
            watch.watch(p.pid, respawn.proc_start_time(p.pid), None, lambda pid, st: seen.append((pid, st)))
            deadline = time.monotonic() + 0.3
            while time.monotonic() < deadline:
                timers.run_due(time.monotonic())
                time.sleep(0.01)
            self.assertEqual(seen, [])
            self.assertTrue(watch.polls)
            p.kill()            # a zombie (nobody reaps it yet) is gone already
            wait_for(lambda: timers.run_due(time.monotonic()) or seen, what="the exit")
        self.assertEqual(seen, [(p.pid, None)])
        self.assertEqual(watch.polls, {})

    def test_an_adopted_exit_is_seen_through_its_pidfd(self):
        p = subprocess.Popen(["sleep", "1000"])
        self.addCleanup(lambda: (p.kill(), p.wait()))
        host = LoopHost(self)
        selector = host.selector
        watch = respawn.AdoptedWatch(host)
        seen = []
        fd = respawn.pidfd_open(p.pid)
        watch.watch(p.pid, respawn.proc_start_time(p.pid), fd, lambda pid, st: seen.append(pid))
        self.assertEqual(selector.select(0.2), [])
        p.kill()
        for key, mask in selector.select(DEADLINE):
            key.data(mask)
        self.assertEqual(seen, [p.pid])
        self.assertEqual(watch.pidfds, {})
        self.assertRaises(OSError, os.fstat, fd)        # closed

    def test_take_fds_copies_a_read_end_another_process_holds(self):
        r, w = os.pipe()
        held = fcntl_dup = __import__("fcntl").fcntl(r, __import__("fcntl").F_DUPFD_CLOEXEC, 40)
        p = subprocess.Popen(["sleep", "1000"], pass_fds=(held,))
        self.addCleanup(lambda: (p.kill(), p.wait()))
        for fd in (r, held):
            os.close(fd)
        pidfd = respawn.pidfd_open(p.pid)
        self.addCleanup(os.close, pidfd)
        (taken,) = respawn.take_fds(pidfd, [fcntl_dup])
        self.addCleanup(os.close, taken)
        self.assertFalse(os.get_inheritable(taken))
        os.write(w, b"waiting in the pipe\n")
        os.close(w)
        self.assertEqual(os.read(taken, 100), b"waiting in the pipe\n")
        with self.assertRaises(OSError) as caught:
            respawn.take_fds(pidfd, [999])
        self.assertEqual(caught.exception.errno, errno.EBADF)

    def test_services_hold_their_read_ends_above_fd_9_and_carry_their_marker(self):
        sup = Sup(self, "[respawn]\nwatch_self = false\n[program:x]\ncommand = sleep 1000\n"
                        "startsecs = 0\n[program:m]\ncommand = sleep 1000\nstartsecs = 0\n"
                        "redirect_stderr = true\n")
        sup.start()
        for name, n in (("x", 2), ("m", 1)):
            pid = sup.wait_state(name, "RUNNING")["pid"]

            def settled():
                # (the dynamic loader of a just-exec'd program holds fd 3 for a moment)
                fds = {int(fd): os.readlink("/proc/%d/fd/%s" % (pid, fd)) for fd in os.listdir("/proc/%d/fd" % pid)}
                return fds if all(fd <= 2 or fd >= 10 for fd in fds) else None
            fds = wait_for(settled, timeout=5, what="only stdio and the held pipes")
            held = {fd: t for fd, t in fds.items() if fd > 2}
            self.assertEqual(len(held), n, fds)
            self.assertTrue(all(fd >= 10 and t.startswith("pipe:") for fd, t in held.items()), fds)
            # the same pipes as its stdout and stderr
            self.assertEqual(sorted(set(held.values())), sorted({fds[1], fds[2]}))
            self.assertEqual(copies("%s/%s" % (respawn.marker_prefix(sup.config), name)), [pid])
        self.assertEqual(sup.terminate(), 0)


RELEASED_1_0_0 = os.path.join(HERE, ".ci", "data", "respawn-1.0.0.py")   # git show v1.0.0-landed:respawn.py


class TestIdentityUpgrade(unittest.TestCase):
    """Release 1.0.0 kept its lock beside the socket: a 1.0.0 supervisor still
    running is seen, and one that re-executes into this code moves its lock."""

    def start_released(self):
        sup = IdSup(self)
        script = sup.path("respawn.py")
        shutil.copy(RELEASED_1_0_0, script)
        sup.proc = sup.popen(["-c", sup.config, "run"], script=script, stdout=sup.out, stderr=sup.err,
                             start_new_session=True)
        sup.seen_sups[sup.proc.pid] = None
        wait_for(sup.try_status, what="the 1.0.0 supervisor")
        self.assertEqual(sup.status()["supervisor"]["version"], "1.0.0")
        self.assertTrue(os.path.exists(sup.path("s.sock.lock")))
        return sup, script

    def test_a_running_1_0_0_supervisor_is_not_doubled(self):
        sup, _ = self.start_released()
        pids = {s["name"]: s["pid"] for s in sup.status()["services"]}
        p = sup.run("-c", sup.config, "run", "--daemon")
        self.assertEqual((p.returncode, p.stdout, p.stderr),
                         (0, "already running (pid %d)\n" % sup.proc.pid, ""))
        self.assertEqual(supervisors_of(sup.config), [sup.proc.pid])
        self.assertEqual({s["name"]: s["pid"] for s in sup.status()["services"]}, pids)

    def test_a_reexec_from_1_0_0_takes_the_lock_where_it_lives_now(self):
        sup, script = self.start_released()
        pids = {s["name"]: s["pid"] for s in sup.status()["services"]}
        install_by_rename(script, read_text(SCRIPT))
        p = sup.run("-c", sup.config, "reexec")
        self.assertEqual(p.returncode, 0, p.stdout + p.stderr)
        self.assertEqual(sup.status()["supervisor"]["version"], respawn.__version__)
        with open(sup.id_file("lock")) as f:
            self.assertEqual(f.read(), "%d\n%s\n" % (sup.proc.pid, sup.path("s.sock")))
        self.assertFalse(os.path.exists(sup.path("s.sock.lock")), "the old lock is left")
        p = sup.run("-c", sup.config, "run", "--daemon")
        self.assertEqual((p.returncode, p.stdout), (0, "already running (pid %d)\n" % sup.proc.pid))
        wait_for(lambda: os.path.exists(sup.id_file("state")), what="the state file")
        # its services, started by 1.0.0, hold no read end: a crash now adopts them
        # without output to take back; the quiet one lives on
        sup.crash()
        sup.start()
        st = {s["name"]: s for s in sup.status()["services"]}
        self.assertEqual((st["quiet"]["pid"], st["quiet"]["adopted"]), (pids["quiet"], True))
        self.assertEqual(sup.run("-c", sup.config, "shutdown").stdout, "stopped\n")
        self.assertEqual(sup.proc.wait(DEADLINE), 0)
        self.assertFalse(os.path.exists(sup.id_file("lock")))


class TestStateFileTurns(unittest.TestCase):
    @staticmethod
    def stand_in(**fields):
        """A stand-in supervisor with the real release_memory_soon."""
        sup = types.SimpleNamespace(timers=respawn.Timers(), release_due=False, **fields)
        sup.release_memory_soon = lambda: respawn.Supervisor.release_memory_soon(sup)
        sup._release_memory = lambda: respawn.Supervisor._release_memory(sup)
        return sup

    def releases(self, record):
        """Each malloc_trim the code asks for, as record() says it."""
        released = []
        real = respawn.release_free_memory
        respawn.release_free_memory = lambda: released.append(record())
        self.addCleanup(setattr, respawn, "release_free_memory", real)
        return released

    def state_file(self, n):
        """A StateFile of n services on a stand-in supervisor, and the writes it makes."""
        d = temp_dir(self)
        sup = self.stand_in(pipes_of={}, log=None,
                            config=types.SimpleNamespace(path=os.path.join(d, "c.ini")))
        sup.services = {"s%d" % i: types.SimpleNamespace(name="s%d" % i, want=respawn.UP, restarts=0, pid=None)
                        for i in range(n)}
        sup.live = {name: respawn.Live() for name in sup.services}
        path = os.path.join(d, "c.state")
        state = respawn.StateFile(sup, path)
        writes = []
        real = respawn.write_state
        respawn.write_state = lambda *args: (writes.append(args), real(*args))
        self.addCleanup(setattr, respawn, "write_state", real)
        return sup, state, writes, path

    def test_freed_memory_is_given_back_after_a_whole_encoding_not_after_one_entry(self):
        # issue 15: the garbage of encoding 5000 entries stayed resident (2.5 MiB)
        # until malloc_trim; it is called once that turn's write is done
        sup, state, writes, path = self.state_file(300)
        released = self.releases(lambda: len(writes))
        turn = lambda: sup.timers.run_due(respawn.monotonic())
        state.changed()                     # every entry (a start, a takeover, a reload)
        turn()
        self.assertEqual((len(writes), released), (1, []))
        turn()
        self.assertEqual(released, [1])     # after the write, once
        sup.services["s1"].restarts += 1    # one service's event: no release
        state.changed("s1")
        turn(), turn()
        self.assertEqual((len(writes), released), (2, [1]))
        for name, svc in sup.services.items():    # most of them at once (startsecs ending)
            svc.restarts += 1
            state.changed(name)
        turn(), turn()
        self.assertEqual((len(writes), released), (3, [1, 3]))
        sup.release_memory_soon(), sup.release_memory_soon()     # asked twice in a turn: once
        turn(), turn()
        self.assertEqual(released, [1, 3, 3])

    def test_freed_memory_is_given_back_after_a_long_answer(self):
        # issue 15: one `status` of 5000 services left 7 MiB resident (the answer's
        # dicts, its JSON, the buffer) until malloc_trim; it is called once a long
        # answer's connection is done, not after a short one
        sup = self.stand_in(clients={}, followers={}, selector=selectors.DefaultSelector(),
                            accept_paused=None)
        self.addCleanup(sup.selector.close)
        released = self.releases(lambda: True)
        turn = lambda: sup.timers.run_due(respawn.monotonic())

        def answer(text):
            ours, theirs = socket.socketpair()
            self.addCleanup(theirs.close)
            client = respawn.ControlClient(sup, ours)
            client.reply(None, text=text)
            got = b""
            while client.sock is not None:          # the client reads it all
                got += theirs.recv(1 << 20)
                client.flush()
            for chunk in iter(lambda: theirs.recv(1 << 20), b""):
                got += chunk
            self.assertEqual(got, text.encode())
            turn()

        answer('{"ok": true}\n')
        self.assertEqual(released, [])
        answer('{"name": "s"}\n' * (respawn.BIG_ANSWER // 14 + 1))
        self.assertEqual(released, [True])

    def test_one_write_for_a_turn_of_many_timers(self):
        # 20 services whose timers are due at once (startsecs ending together): one
        # write at the end of that turn, not one after each timer
        sup, state, writes, path = self.state_file(20)

        def restarted(svc):
            svc.restarts += 1
            state.changed(svc.name)
        now = respawn.monotonic()
        for svc in sup.services.values():
            sup.timers.at(now - 1, restarted, svc)
        sup.timers.run_due(now)            # one loop turn's timers
        self.assertEqual(writes, [])
        sup.timers.run_due(respawn.monotonic())   # the next turn
        self.assertEqual(len(writes), 1)
        with open(path) as f:
            self.assertEqual([e["restarts"] for e in json.load(f)["services"]], [1] * 20)
        sup.timers.run_due(respawn.monotonic())
        self.assertEqual(len(writes), 1)


class TestStateFileFollows(unittest.TestCase):
    """The state file is written per service (issue 15: encoding every entry at every
    change was 46 ms a restart at 5000 services): each entry still follows what its
    service does, also what changes without a change of state."""

    # ID_CONFIG's [respawn], and services that change without a change of state
    CONFIG = ID_CONFIG.split("[program:")[0] + """\
[program:quiet]
command = sleep 1000
startsecs = 0

[program:closer]
command = sh -c 'trap "exec 1>&-" USR1; echo up; while :; do sleep 0.1 >/dev/null & wait $!; done'
startsecs = 0

[program:stubborn]
command = sh -c 'trap "echo term" TERM; echo up; while :; do sleep 0.1 >/dev/null & wait $!; done'
startsecs = 0
stopwaitsecs = 300
"""

    def entries(self, sup):
        try:
            with open(sup.id_file("state")) as f:
                return {e["name"]: e for e in json.load(f)["services"]}
        except (OSError, ValueError):
            return {}

    def test_each_entry_follows_its_service(self):
        sup = IdSup(self, self.CONFIG).start()
        pids = {n: sup.wait_state(n, "RUNNING")["pid"] for n in ("quiet", "closer", "stubborn")}
        wait_for(lambda: {n: e.get("pid") for n, e in self.entries(sup).items()} == pids,
                 what="the state file to name every service")
        quiet = self.entries(sup)["quiet"]
        self.assertEqual(sorted(p[0] for p in self.entries(sup)["closer"]["pipes"]), ["stderr", "stdout"])
        # a pipe the service closed is no longer one to take back, with no change of state
        wait_for(lambda: "closer | up" in read_text(sup.path("out.txt")), what="closer's first line")
        os.kill(pids["closer"], signal.SIGUSR1)
        wait_for(lambda: [p[0] for p in self.entries(sup)["closer"]["pipes"]] == ["stderr"],
                 what="closer's entry to lose its stdout")
        self.assertEqual(sup.svc("closer")["state"], "RUNNING")
        # what the operator asked, with no change of state: a start while stopping
        wait_for(lambda: "stubborn | up" in read_text(sup.path("out.txt")), what="stubborn's first line")
        for command in ("stop", "start"):      # each waits for its end: left waiting
            client = sup.popen(["-c", sup.config, command, "stubborn"],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            self.addCleanup(client.wait)
            self.addCleanup(client.kill)
            if command == "stop":
                wait_for(lambda: self.entries(sup)["stubborn"]["wanted"] is False and
                         sup.svc("stubborn")["state"] == "STOPPING", what="stubborn stopping")
        wait_for(lambda: self.entries(sup)["stubborn"]["wanted"] is True, what="the start to be written")
        self.assertEqual(sup.svc("stubborn")["state"], "STOPPING")
        # a restart of one service rewrites its entry and leaves the others' as they were
        os.kill(pids["quiet"], signal.SIGKILL)
        new = wait_for(lambda: (lambda s: s if s["pid"] not in (None, pids["quiet"]) and
                                s["state"] == "RUNNING" else None)(sup.svc("quiet")), what="quiet restarted")
        wait_for(lambda: self.entries(sup)["quiet"].get("pid") == new["pid"], what="the new pid written")
        after = self.entries(sup)
        self.assertEqual(after["quiet"]["restarts"], quiet["restarts"] + 1)
        self.assertEqual(after["closer"]["pid"], pids["closer"])
        self.assertEqual(after["stubborn"]["pid"], pids["stubborn"])
        # a reload that removes a service drops its entry once it is gone
        sup.write("c.ini", self.CONFIG.split("[program:stubborn]")[0])
        p = sup.run("-c", sup.config, "reload")
        self.assertEqual(p.returncode, 0, p.stdout + p.stderr)
        os.kill(pids["stubborn"], signal.SIGKILL)    # it ignores the stop (stopwaitsecs 300)
        wait_for(lambda: set(self.entries(sup)) == {"quiet", "closer"}, what="stubborn's entry to go")
        self.assertEqual(sup.run("-c", sup.config, "shutdown").stdout, "stopped\n")
        self.assertEqual(sup.proc.wait(DEADLINE), 0)


# ---------------------------------------------------------------------------
# Config, issues 12 and 13 (config side): bounded reading, ranges, hostile
# values, a fuzzer; supervisord files: syntax, defaults, instances, groups
# ---------------------------------------------------------------------------

ONE_ERROR_LINE = r"^(/[^:]*):(\d+): \S"


def check_cli(test, path, command="check", timeout=60):
    """`check` or `run` on a config file: (exit code, output lines)."""
    p = subprocess.run(respawn_argv(SCRIPT, ["-c", path, command]), stdout=subprocess.PIPE,
                       stderr=subprocess.STDOUT, text=True, timeout=timeout, cwd=os.path.dirname(path))
    test.assertNotIn("Traceback", p.stdout)
    return p.returncode, p.stdout.strip().splitlines()


class TestConfigBoundedReading(unittest.TestCase):
    def test_only_regular_files_are_read(self):
        d = temp_dir(self)
        fifo = os.path.join(d, "fifo")
        os.mkfifo(fifo)
        os.mkdir(os.path.join(d, "adir"))
        for odd, why in [(fifo, "not a regular file"), ("/dev/zero", "not a regular file"),
                         (os.path.join(d, "adir"), "a directory")]:
            main = write_file(os.path.join(d, "main.ini"),
                              "[program:a]\ncommand = true\n[include]\nfiles = %s\n" % odd)
            for command in ("check", "run"):
                with self.subTest(odd=odd, command=command):
                    # as an [include]: one line at the include's line
                    code, lines = check_cli(self, main, command, timeout=30)
                    self.assertEqual(code, 2, lines)
                    self.assertEqual(len(lines), 1, lines)
                    self.assertTrue(lines[0].startswith("%s:4: cannot read the config %r: " % (main, odd)), lines)
                    self.assertIn(why, lines[0])
                    # as the config itself
                    code, lines = check_cli(self, odd, command, timeout=30)
                    self.assertEqual(code, 2, lines)
                    self.assertEqual(len(lines), 1, lines)
                    self.assertIn(why, lines[0])

    def test_size_and_include_depth_are_bounded(self):
        d = temp_dir(self)
        big = write_file(os.path.join(d, "big.ini"), "[program:a]\ncommand = true\n" +
                         ";" * (respawn.MAX_CONFIG_BYTES + 10) + "\n")
        code, lines = check_cli(self, big)
        self.assertEqual((code, len(lines)), (2, 1), lines)
        self.assertIn("larger than 4 MiB", lines[0])
        # a chain of 1200 includes: one line, not RecursionError
        for i in range(1, 1201):
            write_file(os.path.join(d, "c%d.ini" % i), "[include]\nfiles = c%d.ini\n" % (i + 1))
        write_file(os.path.join(d, "c1201.ini"), "[program:z]\ncommand = true\n")
        code, lines = check_cli(self, os.path.join(d, "c1.ini"))
        self.assertEqual((code, len(lines)), (2, 1), lines)
        self.assertRegex(lines[0], r"c%d\.ini:2: includes nested more than %d deep"
                         % (respawn.MAX_INCLUDE_DEPTH + 1, respawn.MAX_INCLUDE_DEPTH))

    def test_long_runs_and_huge_keys_read_in_linear_time(self):
        # configparser's option pattern and the old key scan were quadratic: 12 s
        # for this file.  The bound here is a deadline, far above linear time.
        d = temp_dir(self)
        path = write_file(os.path.join(d, "long.ini"), "[program:a]\ncommand = true\n" + "k" + " " * 300000
                          + "x = 1\n" + "y" * 300000 + " = 2\n" + "z = " + " " * 300000 + "3\n")
        started = time.monotonic()
        with self.assertRaises(respawn.ConfigErrors) as cm:
            respawn.load_config(path)
        self.assertLess(time.monotonic() - started, 5.0)
        errors = [str(e) for e in cm.exception.errors]
        self.assertEqual(len(errors), 3, errors)
        for e, line in zip(errors, (3, 4, 5)):
            self.assertTrue(e.startswith("%s:%d: " % (path, line)), e)
            self.assertLess(len(e), 600)           # the value is cut, not quoted whole

    def test_decoding_errors_and_nul_bytes_name_the_line(self):
        d = temp_dir(self)
        path = os.path.join(d, "c.ini")
        with open(path, "wb") as f:
            f.write(b"[program:a]\ncommand = true\n\n; caf\xe9\n")
        code, lines = check_cli(self, path)
        self.assertEqual((code, len(lines)), (2, 1), lines)
        self.assertTrue(lines[0].startswith("%s:4: cannot read the config: 'utf-8' codec can't decode "
                                            "byte 0xe9 at column 6" % path), lines)
        for where in ("[program:a]\ncommand = tr\0ue\n", "[program:a]\ncommand = true\nuser = ro\0ot\n",
                      "[program\0:a]\ncommand = true\n"):
            with open(path, "w") as f:
                f.write(where)
            line = where[:where.index("\0")].count("\n") + 1
            for command in ("check", "run"):
                code, lines = check_cli(self, path, command)
                self.assertEqual((code, len(lines)), (2, 1), lines)
                self.assertTrue(lines[0].startswith("%s:%d: a NUL byte" % (path, line)), lines)


# key -> (lowest, highest, one below, one above) as written in a config
RANGED_VALUES = {
    "startsecs": ("0", "7d", None, "604801"),
    "stopwaitsecs": ("0", "168h", None, "30d"),
    "backoff_max": ("1", "10080m", None, "1e400"),
    "ready_timeout": ("0", "604800", None, "604800.5"),
    "healthcheck_interval": ("1ms", "7d", None, "8d"),
    "stdout_logfile_maxbytes": ("0", "1024GB", None, "1025GB"),
    "stderr_logfile_backups": ("0", "1000", "-1", "1001"),
    "healthcheck_failures": ("1", "1000", "0", "1001"),
    "priority": ("-1000000000", "1000000000", "-1000000001", "99999999999999999999"),
    "numprocs": ("1", "10000", "0", "10001"),
    "numprocs_start": ("0", "1000000", "-1", "1000001"),
    "startretries": ("0", "1000000", "-1", "1000001"),
    "user": ("0", "4294967294", None, "4294967295"),
    "group": ("0", "4294967294", None, "99999999999999999999"),
    "umask": ("000", "777", None, "1000"),
    "exitcodes": ("0", "255", "-1", "256"),
}


class TestConfigRanges(unittest.TestCase):
    def test_every_value_in_range_passes_and_outside_fails_at_its_line(self):
        for key, (low, high, below, above) in RANGED_VALUES.items():
            for value in (low, high):
                with self.subTest(key=key, value=value):
                    config = load_text(self, "[program:a]\ncommand = true\n%s = %s\n" % (key, value)
                                       + "process_name = a%(process_num)d\n" * (key == "numprocs"))
                    self.assertTrue(config.programs)
            for value in (below, above):
                if value is None:
                    continue
                with self.subTest(key=key, value=value):
                    path, errors, _ = config_errors(self, "[program:a]\ncommand = true\n%s = %s\n" % (key, value))
                    self.assertEqual(len(errors), 1, errors)
                    self.assertTrue(errors[0].startswith("%s:3: %s: " % (path, key)), errors)

    def test_out_of_range_message_gives_the_range(self):
        path, errors, _ = config_errors(self, "[program:a]\ncommand = true\nstartsecs = 30d\n"
                                              "healthcheck_failures = 0\ngroup = 99999999999999999999\n")
        self.assertEqual(errors, [
            "%s:3: startsecs: '30d' is out of range (expected 0 to 7d)" % path,
            "%s:4: healthcheck_failures: '0' is out of range (expected 1 to 1000)" % path,
            "%s:5: group: '99999999999999999999' is out of range (expected an id 0 to 4294967294)" % path])

    def test_unicode_digits_absurd_numbers_and_ids_are_ordinary_errors(self):
        cases = ["user = \u00b2", "startsecs = \u0663", "group = 99999999999999999999",
                 "startsecs = 1e400", "backoff = inf", "stopwaitsecs = nan", "startsecs = -1",
                 "priority = \u0661\u0662", "exitcodes = \u00b2", "umask = \u0660\u0662\u0662",
                 "stopsignal = \u00b9\u2075", "stopsignal = \u0663", "ready = tcp:localhost:\u0668\u0660", "numprocs = 1_0",
                 "stdout_logfile_maxbytes = \uff11MB", "user = root\u3000x", "startretries = 10e3"]
        for case in cases:
            with self.subTest(case=case):
                d = temp_dir(self)
                sock, marker = os.path.join(d, "s.sock"), os.path.join(d, "started")
                path = write_file(os.path.join(d, "c.ini"), "[respawn]\nsocket = %s\nwatch_self = false\n"
                                  "[program:good]\ncommand = touch %s\nstartsecs = 0\n"
                                  "[program:a]\ncommand = true\n%s\n" % (sock, marker, case))
                for command in ("check", "run"):
                    code, lines = check_cli(self, path, command, timeout=30)
                    self.assertEqual(code, 2, lines)
                    self.assertEqual(len(lines), 1, lines)
                    self.assertTrue(lines[0].startswith("%s:9: " % path), lines)
                # run touched nothing
                self.assertFalse(os.path.exists(marker))
                self.assertFalse(os.path.exists(sock))

    def test_a_socket_path_too_long_to_bind_is_a_check_error(self):
        # bind() refuses more than 107 bytes: check passed it and run failed with no line
        d = temp_dir(self)
        path = write_file(os.path.join(d, "c.ini"), "[respawn]\nsocket = %s/%s.sock\n"
                          "[program:a]\ncommand = true\n" % (d, "x" * 120))
        for command in ("check", "run"):
            code, lines = check_cli(self, path, command, timeout=30)
            self.assertEqual(code, 2, lines)
            self.assertEqual(len(lines), 1, lines)
            self.assertTrue(lines[0].startswith("%s:2: socket: the path is " % path), lines)
        config = load_text(self, "[respawn]\nsocket = /tmp/%s.sock\n" % ("x" * 97))
        self.assertEqual(len(config.settings["socket"]), 107)

    def test_a_pidfile_in_a_missing_folder(self):
        # check passed it; run said "cannot start: [Errno 2] ...: '.../x.pid.PID.tmp'"
        d = temp_dir(self)
        pidfile = os.path.join(d, "gone", "x.pid")
        path = write_file(os.path.join(d, "c.ini"), "[respawn]\nsocket = %s/s.sock\npidfile = %s\n"
                          "[program:a]\ncommand = true\n" % (d, pidfile))
        code, lines = check_cli(self, path, "check", timeout=30)
        self.assertEqual((code, lines), (2, ["%s:3: pidfile: folder %r does not exist (create it, "
                                             "or name another)" % (path, os.path.dirname(pidfile))]))
        code, lines = check_cli(self, path, "run", timeout=30)
        self.assertEqual(code, 1, lines)
        self.assertEqual(len(lines), 1, lines)
        self.assertTrue(lines[0].endswith("ERROR cannot start: cannot write the pidfile %s: No such "
                                          "file or directory" % pidfile), lines)
        sd = write_file(os.path.join(d, "s.conf"), "[supervisord]\npidfile = %s\n"
                        "[program:a]\ncommand = true\n" % pidfile)
        self.assertEqual(check_cli(self, sd, "check", timeout=30)[1],
                         ["%s:2: pidfile: folder %r does not exist (create it, or name another)"
                          % (sd, os.path.dirname(pidfile))])

    def test_readme_lists_the_range_of_every_value(self):
        with open(os.path.join(HERE, "README.md")) as f:
            readme = f.read()
        table = readme[readme.index("### Ranges of values"):]
        table = table[:table.index("\n#")]
        for key, (parse, _) in respawn.PROGRAM_KEYS.items():
            if hasattr(parse, "range"):
                with self.subTest(key=key):
                    row = [l for l in table.splitlines() if "`%s`" % key in l]
                    self.assertTrue(row, "no row for %s" % key)
                    low, high = parse.range
                    self.assertIn(low, row[0])
                    self.assertIn(high.split()[0], row[0])


def _fuzz_bases(d):
    """Real configs to mutate: the bundled one, a supervisord one, an include."""
    with open(os.path.join(HERE, "respawn.ini")) as f:
        bundled = f.read()
    os.mkfifo(os.path.join(d, "fifo"))
    os.mkdir(os.path.join(d, "adir"))
    write_file(os.path.join(d, "inc.ini"), "[program:inc]\ncommand = sleep 1\n")
    supervisord = textwrap.dedent("""\
        [supervisord]
        nodaemon=true
        logfile=/dev/null
        pidfile=%(here)s/s.pid
        environment=A="1",B="2"
        [unix_http_server]
        file=/tmp/never.sock
        [include]
        files = inc.ini
        [program:worker]
        command=php artisan queue:work --sleep=3 --tries=3 # the queue
        process_name=%(program_name)s_%(process_num)02d
        numprocs=4
        autostart=true
        autorestart=true
        stopasgroup=true
        user=root
        redirect_stderr=true
        stdout_logfile=%(here)s/worker-%(process_num)d.log
        stopwaitsecs=3600
        [program:nginx]
        command=nginx -g 'daemon off;'
        priority=10
        stdout_logfile=/dev/stdout
        stdout_logfile_maxbytes=0
        [group:web]
        programs=nginx,worker
        priority=5
        """)
    return [bundled, supervisord, ALL_BAD]


def _mutate(text, rng, d):
    lines = text.split("\n")
    choice = rng.randrange(12)
    i = rng.randrange(len(lines))
    key = lines[i].split("=")[0] if "=" in lines[i] else "command"
    if choice == 0:
        lines[i] = lines[i][:rng.randrange(len(lines[i]) + 1)] + "\0" + lines[i][rng.randrange(len(lines[i]) + 1):]
    elif choice == 1:
        lines[i] = "%s= %s" % (key, rng.choice(["9" * rng.randrange(1, 400), "1e400", "-1", "inf", "nan",
                                                "-0", "0x10", "1_000", "99999999999999999999"]))
    elif choice == 2:
        lines[i] = "%s= %s" % (key, rng.choice(["\u00b2", "\u0663", "\u0661\u0660s", "\uff15MB", "\u096b"]))
    elif choice == 3:
        lines[i] = lines[i] + " " * rng.randrange(1000, 200000) + rng.choice(["", "x", "= 1", "#", ";"])
    elif choice == 4:
        lines[i] = "k" * rng.randrange(1000, 200000) + rng.choice(["", " = 1", ":"])
    elif choice == 5:
        lines.insert(i, "[include]\nfiles = %s" % rng.choice(["/dev/zero", "fifo", "adir", "*", "c.ini",
                                                               "inc.ini inc.ini", "/dev/null", "../*"]))
    elif choice == 6:
        del lines[i]
    elif choice == 7:
        lines.insert(i, lines[rng.randrange(len(lines))])
    elif choice == 8:
        lines[i] = "%s= %s" % (key, rng.choice(["%(process_num)999999999d", "%(ENV_NOPE_Q)s", "%", "%(",
                                                "%(here)d", "%(process_num)s%%", "%(numprocs)x"]))
    elif choice == 9:
        lines[i] = "".join(rng.choice("[]=:;#% \t\\'\"\u00e9\u2028\x0b\x1c\r") for _ in range(rng.randrange(1, 30)))
    elif choice == 10:
        lines[i] = "  " + lines[i]                    # a continuation line
    else:
        return "\n".join(lines).encode()[:-rng.randrange(1, 4)] + bytes([rng.randrange(128, 256)])
    return "\n".join(lines)


class TestConfigFuzz(unittest.TestCase):
    def test_every_parser_takes_any_text(self):
        """Each key's parser, on hostile values (fixed seed): a value or ValueError,
        nothing else, and a message that is one short line."""
        rng = random.Random(12)
        atoms = ["", " ", "0", "-1", "1e400", "inf", "nan", "-0", "0x1f", "1_000", "\u00b2", "\u0663",
                 "\uff11", "99999999999999999999", "9" * 5000, " " * 5000, "\t", "\n", "\x0b", "%",
                 "'", '"', "\\", ",", ":", "tcp:", "exec:", "=", "A=", "ms", "KB", "forever", "true",
                 "unexpected", "TERM", "SIG_IGN", "\u2028", "\ud800", "a" * 300, "\x00"]
        tables = [respawn.PROGRAM_KEYS, respawn.RESPAWN_KEYS,
                  {k: v for k, v in respawn.SUPERVISORD_SETTINGS.items()}]
        for n in range(4000):
            table = tables[n % len(tables)]
            key = rng.choice(sorted(table))
            text = "".join(rng.choice(atoms) for _ in range(rng.randrange(1, 4)))
            try:
                table[key][0](text)
            except ValueError as exc:
                self.assertNotIn("\n", str(exc), (key, text))
                self.assertLess(len(str(exc)), 700, (key, text[:80]))
            except Exception as exc:       # noqa: the point of the test
                self.fail("%s = %r: %s: %s" % (key, text[:80], type(exc).__name__, exc))

    def test_mutated_configs_never_trace_back(self):
        """A few thousand mutations of real configs (fixed seed): no exception but
        ConfigErrors, each error one line with FILE:LINE, each case in bounded time;
        and a sample through the command line: exit 0 or 2, never a traceback."""
        rng = random.Random(1213)
        d = temp_dir(self)
        bases = _fuzz_bases(d)
        path = os.path.join(d, "c.ini")
        cases = int(os.environ.get("RESPAWN_FUZZ_CASES", "3000"))
        slowest = 0.0
        sample = []
        for n in range(cases):
            text = bases[n % len(bases)]
            for _ in range(rng.randrange(1, 4)):
                text = _mutate(text.decode("utf-8", "replace") if isinstance(text, bytes) else text, rng, d)
            with open(path, "wb") as f:
                f.write(text if isinstance(text, bytes) else text.encode("utf-8", "surrogatepass"))
            started = time.monotonic()
            try:
                respawn.load_config(path, machine_checks=True)
            except respawn.ConfigErrors as exc:
                for e in exc.errors + exc.warnings:
                    line = str(e)
                    self.assertNotIn("\n", line, (n, text[:300]))
                    self.assertRegex(line, ONE_ERROR_LINE, (n, text[:300]))
            except Exception as exc:       # noqa: the point of the test
                self.fail("case %d: %s: %s\n%r" % (n, type(exc).__name__, exc, text[:300]))
            took = time.monotonic() - started
            slowest = max(slowest, took)
            self.assertLess(took, 5.0, "case %d took %.1f s" % (n, took))
            if n % 100 == 0:
                sample.append(text)
        for n, text in enumerate(sample):
            with open(path, "wb") as f:
                f.write(text if isinstance(text, bytes) else text.encode("utf-8", "surrogatepass"))
            code, lines = check_cli(self, path, timeout=30)
            self.assertIn(code, (0, 2), lines)
            for line in lines:
                self.assertRegex(line, ONE_ERROR_LINE if code == 2 else r"^/", (n, lines))


class TestSupervisordFiles(unittest.TestCase):
    def test_a_section_merged_from_an_include_says_each_key_at_its_own_file_and_line(self):
        # a key's line is kept as a number in its section's file; a key merged in
        # from another file keeps that file
        d = temp_dir(self)
        os.mkdir(os.path.join(d, "conf.d"))
        inc = write_file(os.path.join(d, "conf.d", "inc.conf"), "[program:a]\n\nstartsecs = soon\n")
        main = write_file(os.path.join(d, "supervisord.conf"), """\
            [supervisord]
            [include]
            files = conf.d/*.conf
            [program:a]
            command = sleep 1
            stopwaitsecs = later
            """)
        with self.assertRaises(respawn.ConfigErrors) as caught:
            respawn.load_config(main)
        found = sorted((e.file, e.line, e.message.split(":")[0]) for e in caught.exception.errors)
        self.assertEqual(found, sorted([(inc, 3, "startsecs"), (main, 6, "stopwaitsecs")]))
        write_file(inc, "[program:a]\n\nstartsecs = 2\n")
        write_file(main, open(main).read().replace("later", "3"))
        prog = respawn.load_config(main).programs["a"]
        self.assertEqual((prog.where("startsecs"), prog.where("command"), prog.where("autostart")),
                         ((inc, 3), (main, 5), (main, 4)))

    def test_sections_carried_in_the_older_form_keep_their_lines(self):
        # a handoff from the release before (sections format 2) names each key's
        # line as [file, line]; this code reads that form as well as its own
        d = temp_dir(self)
        path = write_file(os.path.join(d, "c.ini"), "[program:a]\ncommand = sleep 1\nstartsecs = 0\n")
        text = open(path).read()
        carried = {"files": {path: text},
                   "sections": [[path, "program:a", 1, {"command": "sleep 1", "startsecs": "0"},
                                 {"command": [path, 2], "startsecs": [path, 3]}, False]]}
        prog = respawn.load_config(path, read=lambda p: text, carried=carried).programs["a"]
        self.assertEqual((prog.where("startsecs"), prog.where("autostart")), ((path, 3), (path, 1)))
        self.assertEqual(respawn.handoff_load_config(
            {"format": 2, "config": {"path": path, "files": {path: text},
                                     "sections": {"format": 2, "sections": carried["sections"]}}}
        ).programs["a"].where("command"), (path, 2))

    def test_defaults_follow_supervisord_in_its_files_and_their_includes(self):
        d = temp_dir(self)
        os.mkdir(os.path.join(d, "conf.d"))
        write_file(os.path.join(d, "conf.d", "inc.conf"), "[program:inc]\ncommand = sleep 1\n")
        main = write_file(os.path.join(d, "supervisord.conf"), """\
            [supervisord]
            nodaemon = true
            [include]
            files = conf.d/*.conf
            [program:a]
            command = sleep 1
            [program:grouped]
            command = sleep 1
            stopasgroup = true
            """)
        config = respawn.load_config(main)
        for name in ("a", "inc"):
            p = config.programs[name]
            self.assertEqual((p.autorestart, p.stopasgroup, p.killasgroup, p.stdout_logfile, p.stderr_logfile),
                             ("unexpected", False, False, "auto", "auto"), name)
            # and where supervisord's equal ours
            self.assertEqual((p.autostart, p.startsecs, p.startretries, p.stopwaitsecs, p.exitcodes,
                              p.priority, p.redirect_stderr, p.stdout_logfile_maxbytes,
                              p.stdout_logfile_backups, p.stopsignal),
                             (True, 1.0, 3, 10.0, {0}, 999, False, 50 * 1024 ** 2, 10, signal.SIGTERM), name)
        # supervisord: killasgroup follows stopasgroup
        self.assertEqual((config.programs["grouped"].stopasgroup, config.programs["grouped"].killasgroup),
                         (True, True))
        # the same program in a file without [supervisord]: respawn's own defaults
        plain = load_text(self, "[program:a]\ncommand = sleep 1\n").programs["a"]
        self.assertEqual((plain.autorestart, plain.stopasgroup, plain.killasgroup, plain.stdout_logfile),
                         (True, True, True, None))
        path, errors, _ = config_errors(self, "[supervisord]\n[program:a]\ncommand = x\nstopasgroup = true\n"
                                              "killasgroup = false\n")
        self.assertEqual(len(errors), 1, errors)
        self.assertTrue(errors[0].startswith("%s:5: stopasgroup = true needs killasgroup = true" % path))

    def test_inline_comments_and_repeated_keys_and_sections(self):
        d = temp_dir(self)
        write_file(os.path.join(d, "more.conf"), "[program:a]\nstartsecs = 3\n")
        main = write_file(os.path.join(d, "s.conf"), """\
            [supervisord]
            logfile = %(here)s/sd.log   # the log
            [include]
            files = more.conf
            [program:a]
            command = /bin/sleep 1000 # start the app
            stdout_logfile = %(here)s/a.log ; log file
            priority = 1
            priority = 2
            [program:a]
            autostart = false
            """)
        config = respawn.load_config(main)
        a = config.programs["a"]
        self.assertEqual(a.command, ("/bin/sleep", "1000"))
        self.assertEqual(a.stdout_logfile, os.path.join(d, "a.log"))
        self.assertEqual((a.priority, a.autostart, a.startsecs), (2, False, 3.0))
        self.assertEqual(config.settings["logfile"], os.path.join(d, "sd.log"))
        warnings = sorted((w.line, w.file, w.message) for w in config.warnings)
        self.assertEqual([(w[0], w[1]) for w in warnings], [(1, os.path.join(d, "more.conf")), (9, main), (10, main)],
                         warnings)
        self.assertIn("key 'priority' appears again in [program:a] (line 8 before): the last value wins",
                      warnings[1][2])
        self.assertIn("[program:a] appears again", warnings[0][2])
        # a respawn file keeps '#' (SPEC: only ';' there) and refuses a repeat
        plain = load_text(self, "[program:a]\ncommand = echo a # b\n").programs["a"]
        self.assertEqual(plain.command, ("echo", "a", "#", "b"))

    def test_instances_and_every_expansion(self):
        os.environ["RESPAWN_CFG_TEST_Y"] = "from-env"
        self.addCleanup(os.environ.pop, "RESPAWN_CFG_TEST_Y", None)
        config = load_text(self, """\
            [supervisord]
            environment = GLOBAL="g"
            [program:worker]
            command = /bin/echo %(process_num)d %(process_num)03d %(process_num)-3d| %(numprocs)d %(group_name)s %(host_node_name)s %(ENV_PORT)s %(ENV_RESPAWN_CFG_TEST_Y)s %(ENV_GLOBAL)s 100%%
            process_name = %(program_name)s_%(process_num)02d
            numprocs = 3
            numprocs_start = 8
            environment = PORT="80%(process_num)02d",HOME_DIR="%(here)s"
            stdout_logfile = %(here)s/w-%(process_num)x.log
            directory = %(here)s
            """, name="s.conf")
        here = os.path.dirname(config.path)
        self.assertEqual(list(config.programs), ["worker_08", "worker_09", "worker_10"])
        w = config.programs["worker_10"]
        self.assertEqual(w.command, ("/bin/echo", "10", "010", "10", "|", "3", "worker", os.uname().nodename,
                                     "8010", "from-env", "g", "100%"))
        self.assertEqual(w.environment, {"GLOBAL": "g", "PORT": "8010", "HOME_DIR": here})
        self.assertEqual(w.stdout_logfile, os.path.join(here, "w-a.log"))
        self.assertEqual((w.program_name, w.process_num, w.directory), ("worker", 10, here))
        self.assertEqual(config.groups["worker"], ["worker_08", "worker_09", "worker_10"])
        # the same in a respawn file (numprocs is SPEC's there too)
        config = load_text(self, "[program:w]\ncommand = echo %(process_num)d\nnumprocs = 2\n"
                                 "process_name = w%(process_num)d\n")
        self.assertEqual([p.command for p in config.programs.values()], [("echo", "0"), ("echo", "1")])

    def test_expansion_errors(self):
        cases = [
            ("[program:a]\ncommand = echo %(ENV_RESPAWN_NOT_SET_Q)s\n",
             "environment variable RESPAWN_NOT_SET_Q is not set"),
            ("[program:a]\ncommand = echo %(nope)s\n", "unknown expansion %(nope)s"),
            ("[supervisord]\n[program:a]\ncommand = date +%Y\n", "a lone % in"),
            ("[program:a]\ncommand = echo %(process_num)99999d\n", "cannot expand"),
            ("[program:a]\ncommand = echo %(here)d\n", "cannot expand"),
            ("[program:a]\ncommand = x\nnumprocs = 2\n", "needs %(process_num) in process_name"),
            ("[program:a]\ncommand = x\nprocess_name = b\n[program:b]\ncommand = y\n", "is also a service of [program:a]"),
            ("[program:a]\ncommand = x\nprocess_name = a:%(process_num)d\n", "gives the name 'a:0'"),
        ]
        for text, fragment in cases:
            with self.subTest(text=text):
                path, errors, _ = config_errors(self, text)
                self.assertEqual(len(errors), 1, errors)
                self.assertIn(fragment, errors[0])
                self.assertRegex(errors[0], r"^%s:[234]: " % re.escape(path))
        # a lone % stays literal in a respawn file
        self.assertEqual(load_text(self, "[program:a]\ncommand = date +%Y\n").programs["a"].command, ("date", "+%Y"))

    def test_groups_and_names(self):
        config = load_text(self, """\
            [supervisord]
            [program:web]
            command = sleep 1
            priority = 50
            [program:worker]
            command = sleep 1
            process_name = worker%(process_num)d
            numprocs = 2
            [program:solo]
            command = sleep 1
            [group:app]
            programs = web, worker
            priority = 7
            """)
        self.assertEqual(config.groups["app"], ["web", "worker0", "worker1"])
        self.assertEqual([config.programs[n].priority for n in ("web", "worker0", "solo")], [7, 7, 999])
        self.assertEqual(config.programs["worker1"].group_name, "app")
        expand = lambda *p: respawn.expand_names(config, p)
        self.assertEqual(expand("app"), (["web", "worker0", "worker1"], []))
        self.assertEqual(expand("app:*"), (["web", "worker0", "worker1"], []))
        self.assertEqual(expand("worker:*", "solo"), (["worker0", "worker1", "solo"], []))
        self.assertEqual(expand("app:worker1", "worker1", "nope", "app:nope"), (["worker1"], ["nope", "app:nope"]))
        path, errors, _ = config_errors(self, "[program:a]\ncommand = x\n[group:g]\nprograms = a, b\n")
        self.assertEqual(errors, ["%s:4: [group:g] names 'b', which is not a [program:NAME]" % path])
        # requires may name a program with instances: each of them
        config = load_text(self, "[program:db]\ncommand = x\nprocess_name = db%(process_num)d\nnumprocs = 2\n"
                                 "[program:app]\ncommand = x\nrequires = db\n")
        self.assertEqual(config.programs["app"].requires, ("db0", "db1"))

    def test_supervisord_section_keys_and_other_sections(self):
        d = temp_dir(self)
        path = write_file(os.path.join(d, "s.conf"), """\
            [supervisord]
            logfile = %(here)s/sd.log
            pidfile = %(here)s/sd.pid
            loglevel = blather
            childlogdir = %(here)s/logs
            umask = 002
            minfds = 4096
            minprocs = 300
            directory = %(here)s
            environment = K="v"
            nodaemon = true
            identifier = box
            logfile_maxbytes = 1MB
            strip_ansi = true
            colour = blue
            [unix_http_server]
            file = /tmp/s.sock
            [inet_http_server]
            port = 127.0.0.1:9001
            [supervisorctl]
            serverurl = unix:///tmp/s.sock
            [rpcinterface:supervisor]
            supervisor.rpcinterface_factory = supervisor.rpcinterface:make_main_rpcinterface
            [fcgi-program:php]
            command = php-cgi
            socket = tcp://127.0.0.1:9000
            [program:a]
            command = true
            nice = 5
            """)
        code, lines = check_cli(self, path)
        self.assertEqual(code, 0, lines)
        config = respawn.load_config(path)
        s = config.settings
        self.assertEqual((s["logfile"], s["pidfile"], s["loglevel"], s["logdir"], s["umask"], s["minfds"],
                          s["minprocs"], s["directory"], s["environment"]),
                         (d + "/sd.log", d + "/sd.pid", "debug", d + "/logs", 0o2, 4096, 300, d, {"K": "v"}))
        self.assertEqual(config.programs["a"].environment, {"K": "v"})
        out = "\n".join(lines)
        for line, level, fragment in [(12, "warning", "[supervisord] identifier has no effect here"),
                                      (13, "warning", "[supervisord] logfile_maxbytes has no effect here"),
                                      (14, "warning", "[supervisord] strip_ansi has no effect here"),
                                      (15, "warning", "unknown key 'colour' in [supervisord]"),
                                      (16, "info", "[unix_http_server] serves supervisorctl"),
                                      (18, "info", "[inet_http_server] serves supervisorctl"),
                                      (20, "info", "[supervisorctl] serves supervisorctl"),
                                      (22, "info", "[rpcinterface:supervisor] serves supervisorctl"),
                                      (24, "warning", "[fcgi-program:php]: fcgi-program is not implemented; "
                                                     "program php will not be started"),
                                      (29, "warning", "'nice' is a supervisord key")]:
            self.assertIn("%s:%d: %s: %s" % (path, line, level, fragment), out)
        self.assertEqual(len(lines), 11, out)      # those ten, and ok

    def test_container_idioms_are_quiet_and_safe(self):
        import pwd
        me = pwd.getpwuid(os.geteuid()).pw_name
        config = load_text(self, """\
            [supervisord]
            user = %s
            [program:a]
            command = true
            stdout_logfile = /dev/stdout
            stderr_logfile = /dev/stderr
            [program:b]
            command = true
            stdout_logfile = %%(here)s/b.log
            """ % me)
        # user = (the supervisor's own user) is already so: no warning
        self.assertEqual(config.warnings, [])
        # a device is never rotated (renaming /dev/stdout would move it for everyone)
        a, b = config.programs["a"], config.programs["b"]
        self.assertEqual((a.stdout_logfile_maxbytes, a.stderr_logfile_maxbytes), (0, 0))
        self.assertEqual(b.stdout_logfile_maxbytes, 50 * 1024 ** 2)
        other = "nobody" if me != "nobody" else "root"
        config = load_text(self, "[supervisord]\nuser = %s\n[program:a]\ncommand = true\n" % other)
        self.assertEqual([w.message for w in config.warnings],
                         ["[supervisord] user has no effect here: respawn does not switch user: start it "
                          "as that user (each program's user = works)"])

    def test_check_reports_text_and_machine_problems_together_at_their_keys(self):
        code, out, path = run_check(self, """\
            [program:a]
            command = /no/such/program-q
            user = no-such-user-respawn-q
            startsecs = 5x
            [program:b]
            command = true
            directory = /no/such/dir-q
            """)
        self.assertEqual(code, 2, out)
        self.assertEqual(sorted(out.strip().splitlines()), sorted([
            "%s:2: [program:a] command '/no/such/program-q' not found" % path,
            "%s:3: [program:a] unknown user 'no-such-user-respawn-q'" % path,
            "%s:4: startsecs: expected a duration such as 10, 0.5, 500ms, 2s or 1m, not '5x'" % path,
            "%s:7: [program:b] directory '/no/such/dir-q' does not exist" % path]))

    def test_carried_sections_keep_the_supervisord_reading(self):
        config = load_text(self, """\
            [supervisord]
            environment = G="1"
            [program:w]
            command = echo %(process_num)d # comment
            process_name = w%(process_num)d
            numprocs = 2
            [group:g]
            programs = w
            """)
        sections = json.loads(json.dumps(config.sections))
        again = respawn.load_config(config.path, read=lambda p: self.fail("read %s" % p),
                                    carried={"files": config.files, "sections": sections})
        self.assertEqual(list(again.programs), ["w0", "w1"])
        for name, prog in config.programs.items():
            self.assertEqual(vars(again.programs[name]), vars(prog), name)
        self.assertEqual(again.groups, config.groups)
        self.assertEqual(again.settings, config.settings)


class TestSupervisordRun(unittest.TestCase):
    def test_instances_groups_and_supervisord_settings_at_run_time(self):
        import resource
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        minfds = soft + 10 if hard == resource.RLIM_INFINITY or soft + 10 <= hard else soft
        sup = Sup(self, """\
            [respawn]
            watch_self = false
            [supervisord]
            minfds = {minfds}
            pidfile = {dir}/supervisord.pid
            umask = 027
            environment = FROM_SUPERVISORD="yes"
            directory = {dir}
            [program:worker]
            command = sh -c 'echo "$N $FROM_SUPERVISORD $(umask) $(pwd)" > w%(process_num)d.out; exec sleep 1000'
            process_name = %(program_name)s_%(process_num)02d
            numprocs = 2
            environment = N="%(process_num)d"
            stdout_logfile = NONE   # not AUTO
            stderr_logfile = NONE
            [program:web]
            command = sleep 1000
            stdout_logfile = NONE
            stderr_logfile = NONE
            [group:front]
            programs = web
            """.replace("{minfds}", str(minfds)))
        sup.start()
        for name in ("worker_00", "worker_01", "web"):
            sup.wait_state(name, "RUNNING")
        self.assertEqual(sorted(s["name"] for s in sup.status()["services"]), ["web", "worker_00", "worker_01"])
        with open(sup.path("supervisord.pid")) as f:
            self.assertEqual(int(f.read()), sup.proc.pid)
        for n in (0, 1):
            out = wait_for(lambda: (lambda t: t if t.endswith("\n") else None)(
                read_text(sup.path("w%d.out" % n)) if os.path.exists(sup.path("w%d.out" % n)) else ""),
                what="w%d.out" % n)
            self.assertEqual(out, "%d yes 0027 %s\n" % (n, sup.dir))
        with open("/proc/%d/limits" % sup.proc.pid) as f:
            limits = [l for l in f if l.startswith("Max open files")][0].split()
        self.assertEqual(int(limits[3]), minfds)
        # instances survive a re-exec as they are (their names are in the carried sections)
        before = {s["name"]: s["pid"] for s in sup.status()["services"]}
        p = sup.ctl("reexec")
        self.assertEqual(p.returncode, 0, p.stdout + p.stderr)
        wait_for(lambda: sup.status()["supervisor"]["reexecs"] == 1, what="the re-exec")
        self.assertEqual({s["name"]: s["pid"] for s in sup.status()["services"]}, before)
        p = sup.ctl("stop", "worker:*")
        self.assertEqual(p.returncode, 0, p.stdout + p.stderr)
        self.assertEqual(sup.svc("worker_00")["state"], "STOPPED")
        self.assertEqual(sup.svc("worker_01")["state"], "STOPPED")
        self.assertEqual(sup.svc("web")["state"], "RUNNING")
        old = sup.svc("web")["pid"]
        p = sup.ctl("restart", "front")
        self.assertEqual(p.returncode, 0, p.stdout + p.stderr)
        sup.wait_pid_change("web", old)
        p = sup.ctl("start", "front:web", "worker_01")
        self.assertEqual(p.returncode, 0, p.stdout + p.stderr)
        sup.wait_state("worker_01", "RUNNING")
        p = sup.ctl("stop", "nope:*")
        self.assertEqual(p.returncode, 1, p.stdout + p.stderr)
        self.assertIn("no such service: nope:*", p.stdout + p.stderr)
        self.assertEqual(sup.terminate(), 0)
        self.assertFalse(os.path.exists(sup.path("supervisord.pid")))


    def test_reload_adds_and_removes_instances(self):
        text = """\
            [respawn]
            watch_self = false
            [supervisord]
            [program:w]
            command = sleep 100%(process_num)d
            process_name = w%(process_num)d
            numprocs = {n}
            stdout_logfile = NONE
            stderr_logfile = NONE
            """
        sup = Sup(self, text.replace("{n}", "2"))
        sup.start()
        sup.wait_state("w0", "RUNNING")
        sup.wait_state("w1", "RUNNING")
        kept = sup.svc("w0")["pid"]
        sup.write_config(textwrap.dedent(text.replace("{n}", "3")))
        p = sup.ctl("reload")
        self.assertEqual(p.returncode, 0, p.stdout + p.stderr)
        sup.wait_state("w2", "RUNNING")
        self.assertEqual(sup.svc("w0")["pid"], kept)          # untouched
        sup.write_config(textwrap.dedent(text.replace("{n}", "1")))
        p = sup.ctl("reload")
        self.assertEqual(p.returncode, 0, p.stdout + p.stderr)
        wait_for(lambda: sorted(s["name"] for s in sup.status()["services"]) == ["w0"], what="w1, w2 removed")
        self.assertEqual(sup.svc("w0")["pid"], kept)
        self.assertEqual(sup.terminate(), 0)

class TestConfigIniReader(unittest.TestCase):
    def test_reads_what_configparser_reads(self):
        """respawn's linear INI reader against configparser (the reference of both
        dialects: respawn's strict one, and supervisord's) on random small files."""
        import configparser
        rng = random.Random(4242)
        pieces = ["[a]", "[b]", "[program:x]", " [c] ; note", "[a] # x", "k = v", "K: v", "k=v ; c",
                  "k = v # c", "k = v;c", "k2 = two  words", "k3 =", "  more", "\tmore", "", "   ",
                  "; comment", "# comment", "  ; indented comment", "k4 = a = b", "k5 : a : b",
                  "x", "= v", "k6 = [x]", "key with spaces = 1", "k7 = %(here)s",
                  "k9 = a#b ;c #d", "k10 = #x", "k11=;", "[d];x", "[e] ;x"]
        if sys.version_info >= (3, 13):
            # before 3.13 configparser cut this at '#' (a quirk of its search that
            # 3.13 dropped); respawn cuts at the first comment, as 3.13 does
            pieces.append("k8 = a;b;c ;d #e")
        for n in range(3000):
            text = "[a]\n" * rng.randrange(2) + "\n".join(
                rng.choice(pieces) for _ in range(rng.randrange(1, 12))) + "\n"
            for supervisord in (False, True):
                with self.subTest(n=n, supervisord=supervisord, text=text):
                    if supervisord:
                        parser = configparser.RawConfigParser(strict=False, inline_comment_prefixes=(";", "#"),
                                                              default_section="\0")
                    else:
                        parser = configparser.RawConfigParser(strict=True, inline_comment_prefixes=(";",),
                                                              default_section="\0", empty_lines_in_values=False)
                    try:
                        parser.read_string(text)
                        want = {s: dict(parser.items(s)) for s in parser.sections()}
                    except configparser.Error:
                        want = None
                    sections, problems = respawn._parse_ini(text, supervisord)
                    if want is None:
                        self.assertTrue([p for p in problems if p[1] != "warning"], problems)
                        continue
                    self.assertEqual([p for p in problems if p[1] != "warning"], [])
                    got = {}
                    for name, line, values, lines in sections:
                        got.setdefault(name, {}).update(values)
                    self.assertEqual(got, want)

_SUPERVISORD_PY = []


def supervisord_python(test):
    """A Python with supervisor 4 importable: $RESPAWN_SUPERVISORD_PYTHON, or a scratch
    venv made once per run; the test is skipped, with the reason, if neither works."""
    if not _SUPERVISORD_PY:
        py = os.environ.get("RESPAWN_SUPERVISORD_PYTHON")
        reason = None
        if not py:
            d = tempfile.mkdtemp(prefix="respawn-supervisord-venv-")
            import atexit
            atexit.register(shutil.rmtree, d, True)
            py = os.path.join(d, "bin", "python")
            try:
                subprocess.run([PY, "-m", "venv", d], check=True, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, timeout=300)
                subprocess.run([py, "-m", "pip", "install", "-q", "supervisor>=4,<5"], check=True,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=600)
            except (subprocess.CalledProcessError, subprocess.TimeoutExpired, OSError) as exc:
                reason = "cannot install supervisor 4 into a venv: %s" % (
                    getattr(exc, "output", b"") or str(exc).encode())[-300:].decode("utf-8", "replace")
        _SUPERVISORD_PY.append((py, reason))
    py, reason = _SUPERVISORD_PY[0]
    if reason:
        test.skipTest(reason)
    return py


# supervisord's own reading of a config, as JSON: every process of every group
SUPERVISORD_DUMP = r"""
import json, shlex, sys
from supervisor.options import ServerOptions
from supervisor import datatypes
o = ServerOptions()
o.realize(args=["-c", sys.argv[1]])
out = {}
log = lambda v: "auto" if v is datatypes.Automatic else "none" if v is None else v
for g in o.process_group_configs:
    for p in g.process_configs:
        ar = p.autorestart
        out[p.name] = {
            "group": g.name, "command": shlex.split(p.command), "environment": p.environment or {},
            "autostart": p.autostart, "startsecs": p.startsecs, "startretries": p.startretries,
            "autorestart": {False: False}.get(ar, "unexpected" if ar is datatypes.RestartWhenExitUnexpected else True),
            "stopasgroup": p.stopasgroup, "killasgroup": p.killasgroup, "stopwaitsecs": p.stopwaitsecs,
            "exitcodes": sorted(p.exitcodes), "redirect_stderr": p.redirect_stderr,
            "stdout": log(p.stdout_logfile), "stderr": log(p.stderr_logfile),
            "directory": p.directory, "umask": p.umask, "priority": p.priority}
print(json.dumps(out))
"""


def respawn_reading(path):
    config = respawn.load_config(path)
    out = {}
    for name, p in config.programs.items():
        stderr = p.stream_target("stderr")
        out[name] = {
            "group": p.group_name, "command": list(p.command), "environment": p.environment,
            "autostart": p.autostart, "startsecs": p.startsecs, "startretries": p.startretries,
            "autorestart": p.autorestart, "stopasgroup": p.stopasgroup, "killasgroup": p.killasgroup,
            "stopwaitsecs": p.stopwaitsecs, "exitcodes": sorted(p.exitcodes),
            "redirect_stderr": p.redirect_stderr, "stdout": p.stream_target("stdout"),
            "stderr": "none" if stderr == "merged" else stderr, "directory": p.directory,
            "umask": p.umask, "priority": p.priority}
    return out


class TestSupervisordReadsTheSame(unittest.TestCase):
    """Tricky supervisord files read by supervisor 4 itself and by respawn: the
    same processes with the same commands, environments and policies."""

    def compare(self, files, skip=()):
        py = supervisord_python(self)
        d = temp_dir(self)
        for name, text in files.items():
            os.makedirs(os.path.dirname(os.path.join(d, name)), exist_ok=True)
            write_file(os.path.join(d, name), text.replace("{dir}", d))
        main = os.path.join(d, "supervisord.conf")
        env = dict(os.environ, RESPAWN_CMP_PORT="8123")
        p = subprocess.run([py, "-c", SUPERVISORD_DUMP, main], stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, text=True, timeout=120, env=env, cwd=d)
        self.assertEqual(p.returncode, 0, p.stderr)
        theirs = json.loads(p.stdout)
        os.environ["RESPAWN_CMP_PORT"] = "8123"
        self.addCleanup(os.environ.pop, "RESPAWN_CMP_PORT", None)
        ours = respawn_reading(main)
        self.assertEqual(sorted(ours), sorted(theirs))
        for name in theirs:
            for key in theirs[name]:
                if key not in skip:
                    self.assertEqual(ours[name][key], theirs[name][key], "%s: %s" % (name, key))
        return ours

    def test_syntax_expansions_and_instances(self):
        ours = self.compare({"supervisord.conf": """\
            [supervisord]
            nodaemon=true                 ; comment
            logfile={dir}/sd.log          # another
            pidfile={dir}/sd.pid
            environment=GLOBAL="g 1",OTHER=two

            [program:worker]
            command=/usr/bin/php %(here)s/artisan queue:work --queue=%(program_name)s-%(process_num)03d # the worker
            process_name=%(program_name)s_%(process_num)02d
            numprocs=3
            numprocs_start=7
            environment=PORT="90%(process_num)02d",NAME="%(group_name)s/%(host_node_name)s"
            stdout_logfile={dir}/%(program_name)s-%(process_num)d.log
            stdout_logfile={dir}/w-%(process_num)x.log
            redirect_stderr=true
            autostart=true
            stopasgroup=true
            exitcodes=0,2
            startsecs=0
            directory=%(here)s

            [program:web]
            command=/bin/sh -c "exec sleep %(ENV_PORT)s %(ENV_RESPAWN_CMP_PORT)s 100%%"
            environment=PORT="80"
            autorestart=false
            priority=10
            umask=022
            stopwaitsecs=3600

            [program:web]
            startretries=9

            [program:long]
            command=/bin/echo a
              b c
              d
            stderr_logfile=NONE
            """})
        self.assertEqual(sorted(ours), ["long", "web", "worker_07", "worker_08", "worker_09"])

    def test_groups_and_includes(self):
        self.compare({"supervisord.conf": """\
            [supervisord]
            [include]
            files = conf.d/*.ini more.conf
            [program:api]
            command=/bin/true
            priority=300
            [program:jobs]
            command=/bin/true %(group_name)s
            process_name=job%(process_num)d
            numprocs=2
            [group:backend]
            programs=api,jobs
            priority=20
            """, "conf.d/a.ini": """\
            [program:inc]
            command=/bin/echo %(here)s
            autorestart=true
            [program:api]
            startsecs=7
            """, "more.conf": """\
            [program:last]
            command=/bin/true
            killasgroup=true
            """}, skip=("priority",))


# ---------------------------------------------------------------------------
# Issue 13 (run-time side): [eventlistener:x], supervisord's listener protocol,
# and the same files run under real supervisord 4 and under respawn.py
# ---------------------------------------------------------------------------

# A listener that writes every event it gets, one JSON line each, to argv[1];
# answers argv[2] ("OK" by default) to each.  Written here, in the protocol's
# own terms (supervisor/childutils.py does the same in Python).
EVENT_RECORDER = r"""
import json, os, sys
out, answer = sys.argv[1], (sys.argv[2] if len(sys.argv) > 2 else "OK")
with open(out, "a") as f:
    f.write(json.dumps({"hello": os.getpid()}) + "\n")
while True:
    sys.stdout.write("READY\n"); sys.stdout.flush()
    line = sys.stdin.readline()
    if not line:
        break
    headers = dict(x.split(":", 1) for x in line.split())
    payload = sys.stdin.read(int(headers["len"]))
    if "\n" in payload:
        head, _, data = payload.partition("\n")
    else:
        head, data = payload, ""
    fields = dict(x.split(":", 1) for x in head.split()) if ":" in head else {}
    with open(out, "a") as f:
        f.write(json.dumps({"headers": headers, "fields": fields, "data": data,
                            "pid": os.getpid()}) + "\n")
    if answer == "DIE":
        os._exit(7)
    if answer == "GARBAGE":
        sys.stdout.write("hello there\n"); sys.stdout.flush()
        answer = "OK"             # the next process (a new one) would answer OK anyway
        continue
    result = answer if not os.path.exists(out + ".ok") else "OK"
    sys.stdout.write("RESULT %d\n%s" % (len(result), result)); sys.stdout.flush()
"""


def read_events(path):
    """The JSON lines a recorder wrote: (hellos, events)."""
    try:
        with open(path) as f:
            lines = [json.loads(l) for l in f if l.strip()]
    except FileNotFoundError:
        return [], []
    return [l["hello"] for l in lines if "hello" in l], [l for l in lines if "headers" in l]


def events_named(events, name, **fields):
    return [e for e in events if e["headers"]["eventname"] == name
            and all(e["fields"].get(k) == v for k, v in fields.items())]


class FakeSelector:
    def __init__(self):
        self.registered = {}

    def register(self, fd, events, data):
        self.registered[fd] = data

    def unregister(self, fd):
        del self.registered[fd]


def hub_for_test(test, running=lambda name: True):
    """An EventHub on real timers and pipes, with its callbacks recorded."""
    logs, restarts = [], []
    timers = respawn.Timers()
    hub = respawn.EventHub(lambda level, message, name=None: logs.append((level, message, name)),
                           timers, FakeSelector(), running,
                           lambda name, why: restarts.append((name, why)))
    test.addCleanup(hub.close)
    return hub, timers, logs, restarts


def listener_program(name="l", events=("PROCESS_STATE",), buffer_size=10):
    prog = program(name)
    prog.events, prog.pool, prog.buffer_size = tuple(events), name, buffer_size
    return prog


def attach_pipe(test, hub, name):
    """A pipe standing for the listener's stdin: what the hub writes, we read."""
    r, w = os.pipe()
    os.set_blocking(r, False)
    os.set_blocking(w, False)
    test.addCleanup(os.close, r)
    hub.attach(name, w)
    return r


def read_pipe(fd):
    try:
        return os.read(fd, 1 << 16)
    except BlockingIOError:
        return b""


class TestEventFormat(unittest.TestCase):
    """What a listener reads is byte for byte what supervisord 4 sends
    (supervisor/process.py _eventEnvelope, events.py payload)."""

    def test_envelope(self):
        data = respawn.format_event("supervisor", 3, "crash", 1, "PROCESS_STATE_EXITED",
                                    "processname:a groupname:a from_state:RUNNING expected:0 pid:42")
        head, _, body = data.partition(b"\n")
        self.assertEqual(head, b"ver:3.0 server:supervisor serial:3 pool:crash poolserial:1 "
                               b"eventname:PROCESS_STATE_EXITED len:%d" % len(body))
        self.assertEqual(body, b"processname:a groupname:a from_state:RUNNING expected:0 pid:42")

    def test_len_counts_bytes(self):
        data = respawn.format_event("s", 0, "p", 0, "TICK_5", "when:\u00e9")
        self.assertTrue(data.startswith(b"ver:3.0 server:s serial:0 pool:p poolserial:0 "
                                        b"eventname:TICK_5 len:7\n"))

    def test_state_payload(self):
        self.assertEqual(respawn.state_payload("w_01", "workers", "STARTING", [("pid", 9)]),
                         "processname:w_01 groupname:workers from_state:STARTING pid:9")

    def test_subscriptions_follow_the_type_tree(self):
        m = respawn.event_matches
        self.assertTrue(m(("PROCESS_STATE",), "PROCESS_STATE_FATAL"))
        self.assertTrue(m(("EVENT",), "TICK_60"))
        self.assertTrue(m(("TICK",), "TICK_5"))
        self.assertFalse(m(("PROCESS_STATE_EXITED",), "PROCESS_STATE_FATAL"))
        self.assertFalse(m(("TICK_5",), "TICK_60"))
        self.assertTrue(m(("SUPERVISOR_STATE_CHANGE",), "SUPERVISOR_STATE_CHANGE_STOPPING"))

    def test_transitions_as_supervisord_names_them(self):
        t = respawn.process_state_events
        R, S, B, E, F = "RUNNING", "STARTING", "BACKOFF", "EXITED", "FATAL"
        self.assertEqual(t(R, S), [(E, R), (S, E)])          # a crash, restarted at once
        self.assertEqual(t(R, B), [(E, R), (B, E)])          # a crash restarted after a wait
        self.assertEqual(t(S, F), [(B, S), (F, B)])          # the last failed start
        self.assertEqual(t(S, R), [(R, S)])
        self.assertEqual(t("STOPPED", "STOPPED"), [])


class TestListenerProtocol(unittest.TestCase):
    """The parser of a listener's stdout, as supervisord's PEventListenerDispatcher."""

    def test_ready_then_result(self):
        p = respawn.ListenerProtocol()
        self.assertEqual(p.feed(b"REA"), [])
        self.assertEqual(p.feed(b"DY\n"), [("ready", None)])
        p.sent()
        self.assertEqual(p.feed(b"RESULT 2\nO"), [])
        self.assertEqual(p.feed(b"KREADY\n"), [("result", b"OK"), ("ready", None)])

    def test_fail_and_long_results(self):
        p = respawn.ListenerProtocol(respawn.ListenerProtocol.BUSY)
        self.assertEqual(p.feed(b"RESULT 4\nFAIL"), [("result", b"FAIL")])
        self.assertEqual(p.state, respawn.ListenerProtocol.ACKNOWLEDGED)

    def test_garbage_is_an_error_each_way(self):
        for state, data in [("ACKNOWLEDGED", b"hello\n"), ("READY", b"x"),
                            ("BUSY", b"RESULT two\nOK"), ("BUSY", b"OK\n"),
                            ("BUSY", b"RESULT 99999999999\n"), ("BUSY", b"R" * 100)]:
            p = respawn.ListenerProtocol(state)
            out = p.feed(data)
            self.assertEqual([w for w, _ in out], ["error"], (state, data))
            self.assertEqual(p.state, "UNKNOWN")
            self.assertEqual(p.feed(b"READY\n"), [], "an UNKNOWN listener is not heard again")


class TestEventHub(unittest.TestCase):
    """Buffers, serials, acknowledgements and overflow, with no process at all."""

    def ready(self, hub, name, fd):
        hub.output(name, b"READY\n")
        return read_pipe(fd)

    def test_events_wait_for_ready_and_carry_serials(self):
        hub, timers, logs, restarts = hub_for_test(self)
        hub.configure({"l": listener_program()})
        fd = attach_pipe(self, hub, "l")
        hub.notify("PROCESS_STATE_RUNNING", "processname:a groupname:a from_state:STARTING pid:1")
        hub.notify("PROCESS_STATE_RUNNING", "processname:b groupname:b from_state:STARTING pid:2")
        self.assertEqual(read_pipe(fd), b"", "nothing before READY")
        first = self.ready(hub, "l", fd)
        self.assertIn(b"serial:0 pool:l poolserial:0 ", first)
        self.assertIn(b"processname:a", first)
        self.assertEqual(self.ready(hub, "l", fd), b"", "READY while busy is not an answer")
        self.assertTrue(restarts, "READY while an event is out breaks the protocol")

    def test_ok_moves_on_fail_comes_back(self):
        hub, timers, logs, restarts = hub_for_test(self)
        hub.configure({"l": listener_program()})
        fd = attach_pipe(self, hub, "l")
        hub.notify("PROCESS_STATE_RUNNING", "processname:a groupname:a from_state:STARTING pid:1")
        hub.notify("PROCESS_STATE_RUNNING", "processname:b groupname:b from_state:STARTING pid:2")
        self.assertIn(b"processname:a", self.ready(hub, "l", fd))
        hub.output("l", b"RESULT 4\nFAIL")
        self.assertEqual(self.ready(hub, "l", fd), b"", "a rejected event waits before it is sent again")
        timers.run_due(respawn.monotonic() + respawn.EVENT_RETRY + 0.1)
        again = read_pipe(fd)
        self.assertIn(b"serial:0 ", again)
        self.assertIn(b"processname:a", again)
        hub.output("l", b"RESULT 2\nOK")
        self.assertIn(b"processname:b", self.ready(hub, "l", fd))
        self.assertEqual(restarts, [])
        self.assertTrue(any("rejected" in m for _, m, _ in logs))

    def test_unacknowledged_event_goes_to_the_next_process(self):
        hub, timers, logs, restarts = hub_for_test(self)
        hub.configure({"l": listener_program()})
        fd = attach_pipe(self, hub, "l")
        hub.notify("PROCESS_STATE_FATAL", "processname:a groupname:a from_state:BACKOFF")
        self.assertIn(b"PROCESS_STATE_FATAL", self.ready(hub, "l", fd))
        hub.detach("l")                               # it died holding the event
        fd2 = attach_pipe(self, hub, "l")
        self.assertIn(b"serial:0 pool:l poolserial:0 eventname:PROCESS_STATE_FATAL",
                      self.ready(hub, "l", fd2))

    def test_overflow_drops_the_oldest_and_says_so(self):
        hub, timers, logs, restarts = hub_for_test(self)
        hub.configure({"l": listener_program(buffer_size=3)})
        fd = attach_pipe(self, hub, "l")
        for n in range(5):
            hub.notify("PROCESS_STATE_RUNNING", "processname:p%d groupname:p%d from_state:STARTING pid:%d"
                       % (n, n, n + 1))
        overflow = [m for level, m, _ in logs if level == "error" and "overflowed" in m]
        self.assertEqual(len(overflow), 2, logs)
        self.assertIn("discarding event 0", overflow[0])
        self.assertIn(b"processname:p2 ", self.ready(hub, "l", fd))

    def test_pools_only_get_what_they_subscribe_to(self):
        hub, timers, logs, restarts = hub_for_test(self)
        hub.configure({"f": listener_program("f", ("PROCESS_STATE_FATAL",)),
                       "e": listener_program("e", ("EVENT",))})
        ff, fe = attach_pipe(self, hub, "f"), attach_pipe(self, hub, "e")
        hub.notify("PROCESS_STATE_RUNNING", "processname:a groupname:a from_state:STARTING pid:1")
        hub.notify("PROCESS_STATE_FATAL", "processname:b groupname:b from_state:BACKOFF")
        got_f = self.ready(hub, "f", ff)
        self.assertIn(b"serial:1 pool:f poolserial:0 eventname:PROCESS_STATE_FATAL", got_f)
        self.assertIn(b"serial:0 pool:e poolserial:0 eventname:PROCESS_STATE_RUNNING",
                      self.ready(hub, "e", fe))

    def test_no_tick_timer_unless_subscribed(self):
        hub, timers, logs, restarts = hub_for_test(self)
        hub.configure({"l": listener_program()})
        self.assertIsNone(hub.tick_timer)
        self.assertEqual(timers.heap, [])
        hub.configure({"l": listener_program(events=("TICK_5",))})
        self.assertIsNotNone(hub.tick_timer)
        fd = attach_pipe(self, hub, "l")
        hub.output("l", b"READY\n")
        start = time.time()
        hub.wall = lambda: start + 5.1
        timers.run_due(respawn.monotonic() + 5.1)
        sent = read_pipe(fd)
        when = int(re.search(rb"when:(\d+)", sent).group(1))
        self.assertEqual(when % 5, 0)
        hub.configure({})
        self.assertIsNone(hub.tick_timer)

    def test_a_full_stdin_waits_for_the_selector(self):
        hub, timers, logs, restarts = hub_for_test(self)
        hub.configure({"l": listener_program()})
        fd = attach_pipe(self, hub, "l")
        hub.output("l", b"READY\n")
        hub.notify("PROCESS_STATE_RUNNING", "processname:a groupname:a from_state:STARTING pid:1 "
                   + "x" * (1 << 20))
        channel = hub.channels["l"]
        self.assertTrue(channel.out, "a megabyte does not fit a pipe")
        self.assertIn(channel.fd, hub.selector.registered)
        got = b""
        while channel.out:
            got += read_pipe(fd)
            hub.selector.registered[channel.fd](None)
        got += read_pipe(fd)
        self.assertTrue(got.endswith(b"x" * 1000))
        self.assertNotIn(channel.fd, hub.selector.registered)


class TestListenerConfig(unittest.TestCase):
    """[eventlistener:x]: supervisord's keys, checks and defaults."""

    def test_keys_and_defaults(self):
        config = load_text(self, """
            [eventlistener:watch]
            command = /bin/cat
            events = PROCESS_STATE_FATAL, PROCESS_STATE_EXITED
            """)
        prog = config.programs["watch"]
        self.assertEqual(prog.events, ("PROCESS_STATE_FATAL", "PROCESS_STATE_EXITED"))
        self.assertEqual((prog.buffer_size, prog.pool, prog.priority), (10, "watch", -1))

    def test_mistakes(self):
        cases = [
            ("events = PROCESS_STATE_FATL", "unknown event type 'PROCESS_STATE_FATL' (did you mean"),
            ("", "has no events"),
            ("events = EVENT\nredirect_stderr = true", "redirect_stderr = true"),
            ("events = EVENT\nbuffer_size = 0", "buffer_size: '0' is out of range (expected 1 to"),
        ]
        for extra, message in cases:
            errors = config_errors(self, "[eventlistener:w]\ncommand = /bin/cat\n" + extra)
            self.assertTrue(any(message in str(e) for e in errors), (extra, [str(e) for e in errors]))

    def test_result_handler_and_events_never_sent_are_warnings(self):
        config = load_text(self, """
            [eventlistener:out]
            command = /bin/cat
            events = PROCESS_LOG, REMOTE_COMMUNICATION
            result_handler = supervisor_stdout:event_handler
            """)
        warnings = [str(w) for w in config.warnings]
        self.assertTrue(any("result_handler supervisor_stdout:event_handler is not run" in w
                            for w in warnings), warnings)
        self.assertTrue(any("REMOTE_COMMUNICATION, which respawn never sends" in w
                            for w in warnings), warnings)


def listener_sup(test, events="PROCESS_STATE", answer="OK", extra="", listener_extra=""):
    sup = Sup(test, """
        [respawn]
        watch_self = false
        %s
        [eventlistener:rec]
        command = {py} {dir}/recorder.py {dir}/events.jsonl %s
        events = %s
        startsecs = 0.3
        %s
        """ % (extra, answer, events, listener_extra))
    write_file(sup.path("recorder.py"), EVENT_RECORDER)
    return sup


class TestListenerRuns(unittest.TestCase):
    """A listener under a real supervisor: the events it reads, what a rejection,
    garbage or a crash of the listener does, and a re-exec in the middle."""

    def events(self, sup):
        return read_events(sup.path("events.jsonl"))

    def test_process_state_events_with_supervisord_fields(self):
        sup = listener_sup(self, "PROCESS_STATE, SUPERVISOR_STATE_CHANGE", extra="""
            [program:crash]
            command = sh -c "sleep 0.6; exit 3"
            startsecs = 0.3
            autorestart = false
            [program:slow]
            ; ignores TERM: its stop lasts stopwaitsecs, and the listener (stopped
            ; after it) has the time to read SUPERVISOR_STATE_CHANGE_STOPPING
            command = sh -c "trap '' TERM; exec sleep 1000"
            stopwaitsecs = 1
            """).start()
        wait_for(lambda: events_named(self.events(sup)[1], "PROCESS_STATE_EXITED"),
                 what="the EXITED event")
        events = self.events(sup)[1]
        names = [e["headers"]["eventname"] for e in events]
        self.assertEqual(names[0], "SUPERVISOR_STATE_CHANGE_RUNNING")
        crash = [(e["headers"]["eventname"], e["fields"]["from_state"]) for e in events
                 if e["fields"].get("processname") == "crash"]
        self.assertEqual(crash, [("PROCESS_STATE_STARTING", "STOPPED"),
                                 ("PROCESS_STATE_RUNNING", "STARTING"),
                                 ("PROCESS_STATE_EXITED", "RUNNING")])
        exited = events_named(events, "PROCESS_STATE_EXITED")[0]
        self.assertEqual(exited["fields"]["expected"], "0")
        running = events_named(events, "PROCESS_STATE_RUNNING", processname="crash")[0]
        self.assertEqual(exited["fields"]["pid"], running["fields"]["pid"])
        self.assertEqual(events_named(events, "PROCESS_STATE_STARTING", processname="crash")[0]
                         ["fields"]["tries"], "0")
        serials = [int(e["headers"]["serial"]) for e in events]
        self.assertEqual(serials, sorted(serials))
        self.assertEqual([int(e["headers"]["poolserial"]) for e in events], list(range(len(events))))
        self.assertEqual({e["headers"]["pool"] for e in events}, {"rec"})
        self.assertEqual({e["headers"]["ver"] for e in events}, {"3.0"})
        self.assertEqual(sup.terminate(), 0)
        self.assertTrue(events_named(self.events(sup)[1], "SUPERVISOR_STATE_CHANGE_STOPPING"))

    def test_a_crash_restarted_at_once_reads_exited_then_starting(self):
        sup = listener_sup(self, "PROCESS_STATE", extra="""
            [program:flaky]
            command = sh -c "sleep 0.8; exit 3"
            startsecs = 0.3
            autorestart = true
            """).start()
        wait_for(lambda: len(events_named(self.events(sup)[1], "PROCESS_STATE_STARTING",
                                          processname="flaky")) >= 2, what="a restart")
        flaky = [(e["headers"]["eventname"], e["fields"]["from_state"], e["fields"].get("expected"))
                 for e in self.events(sup)[1] if e["fields"].get("processname") == "flaky"]
        self.assertEqual(flaky[:4], [("PROCESS_STATE_STARTING", "STOPPED", None),
                                     ("PROCESS_STATE_RUNNING", "STARTING", None),
                                     ("PROCESS_STATE_EXITED", "RUNNING", "0"),
                                     ("PROCESS_STATE_STARTING", "EXITED", None)])

    def test_failed_starts_then_fatal(self):
        sup = listener_sup(self, "PROCESS_STATE_BACKOFF, PROCESS_STATE_FATAL", extra="""
            [program:bad]
            command = sh -c "exit 1"
            startsecs = 1
            startretries = 1
            backoff = 0.1
            """).start()
        wait_for(lambda: events_named(self.events(sup)[1], "PROCESS_STATE_FATAL"), what="FATAL")
        events = self.events(sup)[1]
        self.assertEqual([(e["headers"]["eventname"], e["fields"].get("tries"), e["fields"]["from_state"])
                          for e in events],
                         [("PROCESS_STATE_BACKOFF", "1", "STARTING"),
                          ("PROCESS_STATE_BACKOFF", "2", "STARTING"),
                          ("PROCESS_STATE_FATAL", None, "BACKOFF")])

    def test_rejected_event_is_sent_again(self):
        sup = listener_sup(self, "PROCESS_STATE_RUNNING", answer="FAIL", extra="""
            [program:a]
            command = sleep 1000
            startsecs = 0.2
            """).start()
        wait_for(lambda: len(self.events(sup)[1]) >= 2, what="the event twice")
        write_file(sup.path("events.jsonl.ok"), "")
        events = wait_for(lambda: (lambda ev: ev if any(e["fields"].get("processname") == "a" for e in ev)
                                   and len(ev) >= 3 else None)(self.events(sup)[1]), what="more events")
        first = events[0]["headers"]["serial"]
        self.assertEqual(events[1]["headers"]["serial"], first, "the same event, sent again")
        self.assertIn("rejected", sup.stderr())

    def test_a_listener_that_dies_gets_its_event_back_in_the_next_process(self):
        sup = listener_sup(self, "PROCESS_STATE_RUNNING", answer="DIE", extra="""
            [program:a]
            command = sleep 1000
            startsecs = 0.2
            """).start()
        hellos = wait_for(lambda: (lambda h: h if len(h) >= 2 else None)(self.events(sup)[0]),
                          what="a second listener process")
        events = wait_for(lambda: (lambda ev: ev if len({e["pid"] for e in ev}) >= 2 else None)
                          (self.events(sup)[1]), what="the event in the second process")
        by_pid = {}
        for e in events:
            by_pid.setdefault(e["pid"], []).append(e["headers"]["serial"])
        first, second = by_pid[hellos[0]], by_pid[hellos[1]]
        self.assertEqual(second[0], first[0], "the event it died with comes first in the next")
        self.assertIn("not acknowledged", sup.stderr())

    def test_garbage_restarts_the_listener_and_keeps_the_event(self):
        sup = listener_sup(self, "PROCESS_STATE_RUNNING", answer="GARBAGE", extra="""
            [program:a]
            command = sleep 1000
            startsecs = 0.2
            """).start()
        wait_for(lambda: len(self.events(sup)[0]) >= 2, what="a new listener process")
        events = wait_for(lambda: (lambda ev: ev if len({e["pid"] for e in ev}) >= 2 else None)
                          (self.events(sup)[1]), what="the event in the new process")
        self.assertEqual(events[0]["headers"]["serial"], [e for e in events if e["pid"] != events[0]["pid"]]
                         [0]["headers"]["serial"])
        self.assertIn("broke the event listener protocol", sup.stderr())
        self.assertEqual(sup.svc("a")["state"], "RUNNING")

    def test_overflow_never_blocks_the_supervisor(self):
        # a listener that never says READY: everything overflows, control still answers
        sup = Sup(self, """
            [respawn]
            watch_self = false
            [eventlistener:deaf]
            command = sleep 1000
            events = PROCESS_STATE
            buffer_size = 2
            startsecs = 0
            [program:flap]
            command = sh -c "sleep 0.1; exit 0"
            startsecs = 0
            """).start()
        sup.wait_log("event buffer overflowed (buffer_size 2), discarding event")
        self.assertTrue(sup.status())
        self.assertEqual(sup.svc("deaf")["state"], "RUNNING")

    def test_tick_5(self):
        sup = listener_sup(self, "TICK_5").start()
        events = wait_for(lambda: self.events(sup)[1], timeout=DEADLINE, what="a TICK_5")
        self.assertEqual(events[0]["headers"]["eventname"], "TICK_5")
        self.assertEqual(int(events[0]["headers"]["len"]), len(events[0]["headers"]) and
                         len("when:" + events[0]["fields"]["when"]))
        self.assertEqual(int(events[0]["fields"]["when"]) % 5, 0)

    def test_supervisor_environment(self):
        sup = listener_sup(self, "PROCESS_STATE_RUNNING",
                           listener_extra="environment = RECORD_ENV=1").start()
        pid = wait_for(lambda: (lambda s: s["pid"] if s["state"] == "RUNNING" else None)(sup.svc("rec")),
                       what="the listener running")
        with open("/proc/%d/environ" % pid, "rb") as f:
            env = dict(kv.split(b"=", 1) for kv in f.read().split(b"\0") if b"=" in kv)
        self.assertEqual(env[b"SUPERVISOR_ENABLED"], b"1")
        self.assertEqual(env[b"SUPERVISOR_PROCESS_NAME"], b"rec")
        self.assertEqual(env[b"SUPERVISOR_GROUP_NAME"], b"rec")
        self.assertEqual(env[b"SUPERVISOR_SERVER_URL"], b"unix://" + sup.sock.encode())

    def test_reexec_keeps_the_listener_and_its_conversation(self):
        sup = listener_sup(self, "PROCESS_STATE", extra="""
            [program:a]
            command = sleep 1000
            startsecs = 0.2
            """).start()
        a = sup.wait_state("a", "RUNNING")
        wait_for(lambda: events_named(self.events(sup)[1], "PROCESS_STATE_RUNNING", processname="a"),
                 what="a RUNNING")
        listener = sup.svc("rec")["pid"]
        self.assertEqual(sup.ctl("reexec").returncode, 0)
        wait_for(lambda: "re-executed" in sup.stderr(), what="the re-exec")
        os.kill(a["pid"], signal.SIGKILL)
        exited = wait_for(lambda: events_named(self.events(sup)[1], "PROCESS_STATE_EXITED"),
                          what="EXITED after the re-exec")
        self.assertEqual(exited[0]["pid"], listener, "the same listener process")
        self.assertEqual(exited[0]["fields"]["pid"], str(a["pid"]))
        serials = [int(e["headers"]["serial"]) for e in self.events(sup)[1]]
        self.assertEqual(serials, sorted(set(serials)), "serials go on across the re-exec")

    def test_a_pool_of_listeners_shares_its_buffer(self):
        # numprocs = 2: two processes, one pool; each event goes to one of them
        sup = listener_sup(self, "PROCESS_STATE_RUNNING", extra="""
            [program:a]
            command = sleep 1000
            startsecs = 0.5
            numprocs = 3
            process_name = a_%(process_num)d
            """, listener_extra="numprocs = 2\n        process_name = rec_%(process_num)d").start()
        events = wait_for(lambda: (lambda ev: ev if len(events_named(ev, "PROCESS_STATE_RUNNING")) >= 5
                                   else None)(self.events(sup)[1]), what="5 RUNNING events")
        self.assertEqual({e["headers"]["pool"] for e in events}, {"rec"})
        serials = [e["headers"]["serial"] for e in events]
        self.assertEqual(len(serials), len(set(serials)), "each event to one listener of the pool")
        names = {e["fields"]["processname"] for e in events}
        self.assertEqual(names, {"a_0", "a_1", "a_2", "rec_0", "rec_1"})
        self.assertEqual({e["fields"]["groupname"] for e in events
                          if e["fields"]["processname"].startswith("rec")}, {"rec"})

    def test_a_stop_the_container_listener(self):
        # The pattern of the listeners in the corpus (mailcow, tiangolo, AWX): say
        # READY, and on the first event signal the supervisor through its pidfile.
        sup = Sup(self, """
            [respawn]
            watch_self = false
            pidfile = {dir}/sup.pid
            [program:app]
            command = sh -c "sleep 2; exit 1"
            startsecs = 0.5
            autorestart = false
            [program:other]
            command = sleep 1000
            startsecs = 0.2
            [eventlistener:processes]
            command = sh {dir}/stop-supervisor.sh
            events = PROCESS_STATE_STOPPED, PROCESS_STATE_EXITED, PROCESS_STATE_FATAL
            """)
        write_file(sup.path("stop-supervisor.sh"), textwrap.dedent("""\
            printf "READY\\n"
            while read line; do
              echo "Processing Event: $line" >&2
              kill -3 $(cat "%s")
            done < /dev/stdin
            """ % sup.path("sup.pid")))
        sup.start()
        other = sup.wait_state("other", "RUNNING")["pid"]
        self.assertEqual(sup.proc.wait(DEADLINE), 0, "SIGQUIT from the listener: a clean stop")
        self.assertIn("Processing Event: ver:3.0", sup.stderr())
        self.assertIn("eventname:PROCESS_STATE_EXITED", sup.stderr())
        wait_for(lambda: not pid_alive(other), what="the other service stopped")



# -- the same files under supervisord 4 -------------------------------------------

CORPUS = os.path.join(HERE, ".ci", "data", "supervisord")
_supervisor_bin = []


def supervisor_bin():
    """The bin folder of a venv with supervisor (and superlance) from PyPI:
    $RESPAWN_TEST_SUPERVISORD (set by .ci/run), else one made here once per run.
    Raises SkipTest, with the reason, only where it truly cannot be installed."""
    if _supervisor_bin:
        return _supervisor_bin[0]
    given = os.environ.get("RESPAWN_TEST_SUPERVISORD")
    if given and os.access(given, os.X_OK):
        _supervisor_bin.append(os.path.dirname(os.path.abspath(given)))
        return _supervisor_bin[0]
    venv = tempfile.mkdtemp(prefix="respawn-test-supervisor-")
    import atexit
    atexit.register(shutil.rmtree, venv, True)
    try:
        subprocess.run([PY, "-m", "venv", venv], check=True, capture_output=True, timeout=300)
        subprocess.run([os.path.join(venv, "bin", "pip"), "install", "-q", "supervisor", "superlance"],
                       check=True, capture_output=True, timeout=600)
    except (OSError, subprocess.SubprocessError) as exc:
        detail = getattr(exc, "stderr", b"") or b""
        raise unittest.SkipTest("cannot install supervisor from PyPI into a venv (%s): %s"
                                % (exc, detail.decode(errors="replace").strip()[-300:]))
    _supervisor_bin.append(os.path.join(venv, "bin"))
    return _supervisor_bin[0]


def corpus_origins():
    """name -> (repository, path, commit), from .ci/data/supervisord/ORIGINS."""
    origins = {}
    with open(os.path.join(CORPUS, "ORIGINS")) as f:
        for line in f:
            if line.strip() and not line.startswith("#"):
                name, repo, path, commit = line.rstrip("\n").split("\t")
                origins[name] = (repo, path, commit)
    return origins


# Stand-ins: a program records "group:process pid" (supervisord's own names,
# from the environment both supervisors give it) and sleeps; a listener also
# speaks the protocol and acknowledges everything.
STANDIN_PROGRAM = 'printf "%s:%s %s\\n" "$SUPERVISOR_GROUP_NAME" "$SUPERVISOR_PROCESS_NAME" "$$" >> "$1"\nexec sleep 1000007\n'
STANDIN_LISTENER = r"""
import os, sys
with open(sys.argv[1], "a") as f:
    f.write("%s:%s %d\n" % (os.environ.get("SUPERVISOR_GROUP_NAME"),
                            os.environ.get("SUPERVISOR_PROCESS_NAME"), os.getpid()))
while True:
    sys.stdout.write("READY\n"); sys.stdout.flush()
    line = sys.stdin.readline()
    if not line:
        break
    sys.stdin.read(int(dict(x.split(":", 1) for x in line.split())["len"]))
    sys.stdout.write("RESULT 2\nOK"); sys.stdout.flush()
"""
_KEY = re.compile(r"([^=:\s;#][^=:]*?)\s*[=:]\s*(.*)$")
_ENV = re.compile(r"%\(ENV_([A-Za-z0-9_]+)\)")


# where standin_config puts the files a supervisor writes, under the run's folder
STANDIN_FILES = {"logfile": "supervisord.log", "pidfile": "supervisord.pid", "childlogdir": "childlogs",
                 "file": "supervisor.sock"}


def standin_config(text, tmp, record):
    """A corpus file with the machine taken out and the structure kept.

    Commands become stand-ins; user, directory, chown, socket_owner go (no
    such users or folders here), and so does a listener's result_handler (a
    Python plugin installed beside supervisord, e.g. supervisor_stdout, which
    is Python 2 only); log files, an fcgi socket and the supervisor's own
    files move under tmp (a /dev/ path stays); [include] and
    [inet_http_server] go (they would reach outside the test).  Program names, numprocs,
    process_name, autostart, autorestart, priorities, groups and listeners'
    events stay as they were."""
    out, section, dropping = [], None, False
    program = "sh %s %s" % (os.path.join(tmp, "standin.sh"), record)
    listener = "%s %s %s" % (PY, os.path.join(tmp, "standin-listener.py"), record)
    seen_supervisord = False
    for line in text.splitlines():
        m = re.match(r"\[(.+)\]\s*([;#].*)?$", line.strip()) if not line[:1].isspace() else None
        if m:
            section = m.group(1).strip()
            dropping = section in ("include", "inet_http_server")
            if section == "supervisord":
                seen_supervisord = True
                out.extend([line, "nodaemon = true"])
                continue
            if not dropping:
                out.append(line)
            continue
        if dropping:
            continue
        k = _KEY.match(line) if not line[:1].isspace() else None
        if k is None:
            out.append(line)
            continue
        key = k.group(1).strip().lower()
        kind = (section or "").split(":", 1)[0]
        if kind in ("program", "eventlistener", "fcgi-program"):
            if key == "command":
                line = "command = " + (listener if kind == "eventlistener" else program)
            elif key in ("user", "directory", "socket_owner", "result_handler"):
                continue
            elif key == "socket":
                line = "socket = unix://%s" % os.path.join(tmp, "fcgi-%s.sock" % section.split(":")[1])
            elif key in ("stdout_logfile", "stderr_logfile"):
                value = re.split(r"\s[;#]", k.group(2))[0].strip()
                if value.startswith("/") and not value.startswith("/dev/"):
                    path = os.path.join(tmp, "logs", value.lstrip("/"))
                    if "%" not in os.path.dirname(path):
                        os.makedirs(os.path.dirname(path), exist_ok=True)
                    line = "%s = %s" % (key, path)
        elif section in ("supervisord", "unix_http_server"):
            if key in ("user", "directory", "chown", "nodaemon"):
                continue
            if key in STANDIN_FILES and not (section == "supervisord" and key == "file"):
                line = "%s = %s" % (key, os.path.join(tmp, STANDIN_FILES[key]))
        out.append(line)
    if seen_supervisord:
        # files the supervisor itself writes stay in tmp even when the file names none
        where = out.index("nodaemon = true")
        out[where + 1:where + 1] = ["%s = %s" % (k, os.path.join(tmp, STANDIN_FILES[k]))
                                    for k in ("logfile", "pidfile", "childlogdir")
                                    if not any(re.match(r"%s\s*[=:]" % k, l) for l in out)]
        os.makedirs(os.path.join(tmp, "childlogs"), exist_ok=True)
    return "\n".join(out) + "\n", seen_supervisord


class CorpusRun:
    """One corpus file under one supervisor (supervisord or respawn), in its own folder."""

    def __init__(self, test, name, kind, sd_bin):
        self.name, self.kind = name, kind
        self.tmp = tempfile.mkdtemp(prefix="respawn-corpus-")
        test.addCleanup(shutil.rmtree, self.tmp, True)
        self.record = os.path.join(self.tmp, "started")
        write_file(os.path.join(self.tmp, "standin.sh"), STANDIN_PROGRAM)
        write_file(os.path.join(self.tmp, "standin-listener.py"), STANDIN_LISTENER)
        with open(os.path.join(CORPUS, name)) as f:
            original = f.read()
        text, whole = standin_config(original, self.tmp, self.record)
        conf = os.path.join(self.tmp, name)
        write_file(conf, text)
        if not whole:
            # a conf.d fragment: included by a main file, as it is where it runs
            main, _ = standin_config("[supervisord]\n[unix_http_server]\nfile = x\n",
                                     self.tmp, self.record)
            conf = os.path.join(self.tmp, "supervisord.conf")
            write_file(conf, main + "[include]\nfiles = %s\n" % name)
        env = {k: v for k, v in os.environ.items() if not k.startswith("SUPERVISOR_")}
        env.update({v: "1" for v in _ENV.findall(original) if v not in env})
        env["XDG_RUNTIME_DIR"] = self.tmp
        if kind == "supervisord":
            argv = [os.path.join(sd_bin, "supervisord"), "-n", "-c", conf]
        else:
            argv = [PY, SCRIPT, "-c", conf, "run"]
        self.log = open(os.path.join(self.tmp, "log"), "wb")
        self.proc = subprocess.Popen(argv, stdout=self.log, stderr=subprocess.STDOUT, env=env,
                                     cwd=self.tmp, start_new_session=True)
        test.addCleanup(self.cleanup)

    def lines(self):
        try:
            with open(self.record) as f:
                return [l.split() for l in f if l.strip()]
        except FileNotFoundError:
            return []

    def started(self):
        return {l[0] for l in self.lines()}

    def up(self):
        """The supervisor has read its file and begun: its pidfile is there."""
        return os.path.exists(os.path.join(self.tmp, STANDIN_FILES["pidfile"]))

    def stop(self):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(DEADLINE * 2)
            except subprocess.TimeoutExpired:
                pass

    def cleanup(self):
        self.stop()
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        for line in self.lines():
            pid = int(line[1])
            try:
                with open("/proc/%d/cmdline" % pid, "rb") as f:
                    cmdline = f.read()
                ours = b"1000007" in cmdline or self.tmp.encode() in cmdline
            except OSError:
                continue
            if ours:
                try:
                    os.kill(pid, signal.SIGKILL)
                except OSError:
                    pass
        self.log.close()

    def output(self):
        with open(os.path.join(self.tmp, "log"), "rb") as f:
            return f.read().decode(errors="replace")


def settle(runs, quiet=2.5, timeout=90):
    """Wait until no run has started anything for `quiet` seconds since every
    supervisor was up.  Neither supervisor says "all started" (a program may
    start late, by priority, or never), so the condition is that the records
    stop changing; the quiet time counts only from when each supervisor has
    written its pidfile (both write it before their first spawn) or exited, or
    a loaded machine that takes seconds to start twelve interpreters reads as
    files that start nothing."""
    deadline = time.monotonic() + timeout
    last, since = None, time.monotonic()
    while True:
        now = time.monotonic()
        up = all(r.proc.poll() is not None or r.up() for r in runs)
        state = tuple(len(r.lines()) for r in runs)
        if state != last or not up:
            last, since = state, now
        elif now - since >= quiet:
            return
        if now > deadline:
            raise AssertionError("the corpus runs never settled: %s" % (state,))
        time.sleep(0.1)


def readme_exceptions():
    """The corpus files the README lists as starting a different set, with why."""
    with open(os.path.join(HERE, "README.md")) as f:
        text = f.read()
    part = text.split("#### Corpus files that differ", 1)
    if len(part) < 2:
        return {}
    body = re.split(r"\n#", part[1], maxsplit=1)[0]
    return dict(re.findall(r"^- `([^`]+)`: (.+)$", body, re.M))


def compare_corpus(test, names, batch=6):
    """{name: (supervisord's set, respawn's set)} for these corpus files."""
    sd_bin = supervisor_bin()
    result = {}
    for i in range(0, len(names), batch):
        runs = []
        for name in names[i:i + batch]:
            runs.append((name, CorpusRun(test, name, "supervisord", sd_bin),
                         CorpusRun(test, name, "respawn", sd_bin)))
        settle([r for _, a, b in runs for r in (a, b)])
        for name, a, b in runs:
            # a file refused is a difference too, even where the other starts nothing
            result[name] = ((a.proc.poll() is None, a.started()), (b.proc.poll() is None, b.started()), a, b)
        # stopped all at once: supervisord takes a second or more to stop its children,
        # and one after the other that was most of the test's time
        for _, a, b in runs:
            for r in (a, b):
                if r.proc.poll() is None:
                    r.proc.send_signal(signal.SIGTERM)
        for _, a, b in runs:
            for r in (a, b):
                try:
                    r.proc.wait(DEADLINE * 2)
                except subprocess.TimeoutExpired:
                    pass                    # its cleanup kills it
    return result


class TestSupervisordCorpus(unittest.TestCase):
    """Real supervisord files from public projects (.ci/data/supervisord/ORIGINS)
    start the same set of processes, by group and process name, under
    supervisord 4 and under respawn.py."""

    def test_corpus_has_its_origins(self):
        origins = corpus_origins()
        files = sorted(f for f in os.listdir(CORPUS) if f.endswith(".conf"))
        self.assertGreaterEqual(len(files), 40)
        self.assertEqual(sorted(origins), files, "every file has its origin, and only they")
        for name, (repo, path, commit) in origins.items():
            self.assertRegex(repo, r"^[\w.-]+/[\w.-]+$", name)
            self.assertRegex(commit, r"^[0-9a-f]{40}$", name)
            self.assertTrue(path, name)

    def test_standin_keeps_the_structure(self):
        tmp = temp_dir(self)
        text, whole = standin_config(textwrap.dedent("""\
            [supervisord]
            user = root
            logfile = /var/log/x.log ; the log
            [program:w]
            command = php artisan queue:work ; the worker
            process_name = %(program_name)s_%(process_num)02d
            numprocs = 3
            user = www-data
            directory = /srv
            stdout_logfile = /var/log/w-%(process_num)d.log
            stderr_logfile = /dev/stderr
            [include]
            files = /etc/supervisor/conf.d/*.conf
            [group:g]
            programs = w
            """), tmp, "REC")
        self.assertTrue(whole)
        self.assertIn("numprocs = 3", text)
        self.assertIn("process_name = %(program_name)s_%(process_num)02d", text)
        self.assertIn("command = sh %s REC" % os.path.join(tmp, "standin.sh"), text)
        self.assertNotIn("www-data", text)
        self.assertNotIn("/etc/supervisor", text)
        self.assertNotIn("/srv", text)
        self.assertIn("stdout_logfile = %s/logs/var/log/w-%%(process_num)d.log" % tmp, text)
        self.assertIn("stderr_logfile = /dev/stderr", text)
        self.assertIn("logfile = %s/supervisord.log" % tmp, text)
        self.assertIn("[group:g]\nprograms = w", text)

    def test_corpus_starts_the_same_processes(self):
        names = sorted(corpus_origins())
        result = compare_corpus(self, names)
        differ = {n: r for n, r in result.items() if r[0] != r[1]}
        empty = [n for n, r in result.items() if not r[0][1] and not r[1][1]]
        report = "\n".join("%s: supervisord %s %s, respawn %s %s\n%s" % (
            n, "ran" if r[0][0] else "refused it", sorted(r[0][1]),
            "ran" if r[1][0] else "refused it", sorted(r[1][1]), r[3].output()[-600:])
            for n, r in sorted(differ.items()))
        listed = readme_exceptions()
        self.assertLessEqual(set(differ), set(listed),
                             "files that differ and are not in the README:\n" + report)
        same = len(result) - len(differ)
        self.assertGreaterEqual(same / len(result), 0.95, "%d of %d start the same set:\n%s"
                                % (same, len(result), report))
        self.assertLess(len(empty), len(result) / 4, "most files start something: %s" % empty)



class TestListenersLikeSupervisord(unittest.TestCase):
    """One config with a listener under supervisord 4 and under respawn.py: the
    same events, with the same fields; and a listener from a public project
    (superlance's crashmail, from PyPI) run unchanged."""

    CONFIG = """\
        [supervisord]
        nodaemon = true
        logfile = {dir}/supervisord.log
        pidfile = {dir}/supervisord.pid

        [program:steady]
        command = sleep 1000
        startsecs = 1
        autorestart = true

        [program:crash]
        command = sh -c "sleep 2.5; exit 3"
        startsecs = 1
        autorestart = false

        [program:bad]
        ; well inside startsecs: supervisord's loop wakes once a second, and one
        ; that sleeps past startsecs calls a dead process RUNNING
        command = sh -c "sleep 0.2; exit 1"
        startsecs = 3
        startretries = 1
        autorestart = true

        [eventlistener:rec]
        command = {py} {dir}/recorder.py {dir}/events.jsonl
        events = PROCESS_STATE, SUPERVISOR_STATE_CHANGE_RUNNING
        ; room for every event of the scenario: an overflow would drop different
        ; events under each (their backoff delays differ)
        buffer_size = 50
        """

    def run_one(self, kind, sd_bin):
        tmp = temp_dir(self)
        write_file(os.path.join(tmp, "recorder.py"), EVENT_RECORDER)
        conf = os.path.join(tmp, "supervisord.conf")
        write_file(conf, textwrap.dedent(self.CONFIG).replace("{dir}", tmp).replace("{py}", PY))
        env = {k: v for k, v in os.environ.items() if not k.startswith("SUPERVISOR_")}
        env["XDG_RUNTIME_DIR"] = tmp
        argv = ([os.path.join(sd_bin, "supervisord"), "-n", "-c", conf] if kind == "supervisord"
                else [PY, SCRIPT, "-c", conf, "run"])
        log = open(os.path.join(tmp, "out"), "wb")
        self.addCleanup(log.close)
        proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=tmp,
                                start_new_session=True)

        def stop():
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                proc.wait(DEADLINE)
        self.addCleanup(stop)
        path = os.path.join(tmp, "events.jsonl")

        def done():
            events = read_events(path)[1]
            return events if (events_named(events, "PROCESS_STATE_FATAL", processname="bad")
                              and events_named(events, "PROCESS_STATE_EXITED", processname="crash")
                              and events_named(events, "PROCESS_STATE_RUNNING", processname="steady")) else None
        events = wait_for(done, what="the scenario's events under %s" % kind)
        stop()
        return events

    @staticmethod
    def by_process(events):
        seen = {}
        for e in events:
            f = e["fields"]
            if "processname" in f:
                seen.setdefault(f["processname"], []).append(
                    (e["headers"]["eventname"], f["groupname"], f["from_state"], f.get("expected"),
                     f.get("tries"), sorted(f)))
        return seen

    def test_same_events_as_supervisord(self):
        sd_bin = supervisor_bin()
        theirs = self.run_one("supervisord", sd_bin)
        ours = self.run_one("respawn", sd_bin)
        self.assertEqual(theirs[0]["headers"]["eventname"], "SUPERVISOR_STATE_CHANGE_RUNNING")
        self.assertEqual(ours[0]["headers"]["eventname"], "SUPERVISOR_STATE_CHANGE_RUNNING")
        expected, got = self.by_process(theirs), self.by_process(ours)
        self.assertEqual(sorted(got), sorted(expected))
        for name in expected:
            self.assertEqual(got[name], expected[name], "events of %s" % name)
        for events in (theirs, ours):
            self.assertEqual(sorted(set(e["headers"]) for e in events)[0],
                             {"ver", "server", "serial", "pool", "poolserial", "eventname", "len"})
            for e in events_named(events, "PROCESS_STATE_EXITED"):
                self.assertGreater(int(e["fields"]["pid"]), 0)

    def test_crashmail_from_superlance_runs_unchanged(self):
        sd_bin = supervisor_bin()
        crashmail = os.path.join(sd_bin, "crashmail")
        if not os.access(crashmail, os.X_OK):
            subprocess.run([os.path.join(sd_bin, "pip"), "install", "-q", "superlance"],
                           check=True, capture_output=True, timeout=600)
        sup = Sup(self, """
            [respawn]
            watch_self = false
            [program:crash]
            command = sh -c "sleep 1.5; exit 2"
            startsecs = 0.5
            autorestart = false
            [program:fine]
            command = sh -c "sleep 1.5; exit 0"
            startsecs = 0.5
            autorestart = false
            [eventlistener:crashmail]
            command = %s -a -o respawn-test -m ops@example.com -s "sh {dir}/sendmail.sh"
            events = PROCESS_STATE_EXITED
            """ % crashmail)
        write_file(sup.path("sendmail.sh"), 'cat >> "%s"\n' % sup.path("mail.txt"))
        sup.start()
        crash = sup.wait_state("crash", "RUNNING")["pid"]
        mail = wait_for(lambda: os.path.exists(sup.path("mail.txt")) and read_text(sup.path("mail.txt")),
                        what="crashmail's mail")
        sup.wait_state("fine", "EXITED")
        self.assertIn("To: ops@example.com", mail)
        self.assertIn("Subject: respawn-test: crash crashed at", mail)
        self.assertIn("Process crash in group crash exited unexpectedly (pid %d) from state RUNNING"
                      % crash, mail)
        self.assertEqual(sup.svc("crashmail")["state"], "RUNNING", sup.stderr())
        self.assertEqual(sup.terminate(), 0)
        self.assertNotIn("fine", read_text(sup.path("mail.txt")), "an expected exit is not mailed")

# ---------------------------------------------------------------------------
# Issue 15: RLIMIT_NOFILE (ours raised, the services' kept), the output path
# ---------------------------------------------------------------------------

def nofile_limits(pid):
    """(soft, hard) RLIMIT_NOFILE of a process, from /proc."""
    with open("/proc/%d/limits" % pid) as f:
        for line in f:
            if line.startswith("Max open files"):
                soft, hard = line.split()[3:5]
                return int(soft), int(hard)
    raise AssertionError("no Max open files in /proc/%d/limits" % pid)


def nofile_launcher(soft, hard=None):
    """A prefix that starts the supervisor with this soft (and hard) limit."""
    return (PY, "-c", "import os, resource, sys\n"
            "hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]\n"
            "resource.setrlimit(resource.RLIMIT_NOFILE, (%d, %s))\n"
            "os.execv(sys.argv[1], sys.argv[1:])\n" % (soft, hard if hard is not None else "hard"))


class TestNofileLimit(unittest.TestCase):
    """The supervisor raises its own soft RLIMIT_NOFILE to the hard limit; its
    services get the soft limit it was started with, on every spawn path."""

    def setUp(self):
        soft, hard = nofile_limits(os.getpid())
        if hard < 4096:
            self.skipTest("the hard RLIMIT_NOFILE (%d) leaves no room to test" % hard)
        self.hard = hard

    def test_raised_for_us_kept_for_services(self):
        extra = ""
        if os.geteuid() == 0:
            extra = "[program:asuser]\ncommand = sleep 1000\nuser = nobody\nstartsecs = 0\n"
        sup = core_sup(self, """\
            [program:plain]
            command = sleep 1000
            startsecs = 0
            [program:umasked]
            command = sleep 1000
            umask = 077
            directory = /
            startsecs = 0
            """ + extra)
        sup.start(prefix=nofile_launcher(256))
        self.assertEqual(nofile_limits(sup.proc.pid), (self.hard, self.hard))
        for name in ["plain", "umasked"] + (["asuser"] if extra else []):
            pid = wait_pid(sup, name)
            self.assertEqual(nofile_limits(pid), (256, self.hard), name)
        # the service's clean slate is unchanged by the limit dance
        st = proc_status(wait_pid(sup, "plain"))
        self.assertEqual(int(st["SigBlk"], 16), 0)
        self.assertEqual(int(st["SigIgn"], 16), 0)
        self.assertNotIn("RLIMIT_NOFILE", sup.stderr())
        self.assertEqual(sup.terminate(), 0)

    def test_more_fds_than_the_services_limit(self):
        # 60 services hold ~180 fds: past the services' 128, every spawn still
        # works (Popen's own fds go into the spare low numbers) and each service
        # still gets 128
        sup = core_sup(self, "".join(
            "[program:s%02d]\ncommand = sleep 1000\nstartsecs = 0\n" % i for i in range(60)))
        sup.start(prefix=nofile_launcher(128))
        wait_for(lambda: all(s["state"] == "RUNNING" for s in sup.status()["services"]),
                 what="all 60 running")
        self.assertGreater(fd_count(sup.proc.pid), 128)
        for s in sup.status()["services"]:
            self.assertEqual(nofile_limits(s["pid"])[0], 128, s["name"])
        # a restart once we hold more fds than 128 takes the same path
        victim = sup.svc("s30")
        os.kill(victim["pid"], signal.SIGKILL)
        again = sup.wait_pid_change("s30", victim["pid"])
        self.assertEqual(nofile_limits(again["pid"])[0], 128)
        self.assertEqual(sup.terminate(), 0)

    def test_one_line_when_even_the_hard_limit_is_too_small(self):
        # 13 services: ~60 fds in fact, but the estimate (a margin of 64 and 3 a
        # service) passes the hard limit of 100, so the supervisor still answers
        sup = core_sup(self, "".join(
            "[program:s%02d]\ncommand = sleep 1000\nstartsecs = 0\n" % i for i in range(13)))
        sup.start(prefix=nofile_launcher(64, 100), wait=False)
        sup.wait_log("hard RLIMIT_NOFILE of 100")
        lines = [l for l in sup.stderr().splitlines() if "RLIMIT_NOFILE" in l]
        self.assertEqual(len(lines), 1, lines)
        self.assertIn("13 services need about 103 file descriptors", lines[0])
        self.assertIn("WARN", lines[0].upper())
        wait_for(lambda: sup.answers(), what="the supervisor's socket")
        self.assertEqual(sup.terminate(), 0)

    def test_no_change_when_soft_is_hard(self):
        sup = core_sup(self, "[program:plain]\ncommand = sleep 1000\nstartsecs = 0\n")
        sup.start(prefix=nofile_launcher(512, 512))
        self.assertEqual(nofile_limits(sup.proc.pid), (512, 512))
        self.assertEqual(nofile_limits(wait_pid(sup, "plain")), (512, 512))
        self.assertEqual(sup.terminate(), 0)

    def test_kept_across_a_reexec(self):
        sup = Sup(self, HEADER + "[program:plain]\ncommand = sleep 1000\nstartsecs = 0\n",
                  copy_script=True)
        sup.start(prefix=nofile_launcher(300))
        first = sup.wait_state("plain", "RUNNING")
        out = sup.ctl("reexec")
        self.assertEqual(out.returncode, 0, out.stdout + out.stderr)
        wait_for(lambda: (sup.answers() or {}).get("supervisor", {}).get("reexecs") == 1,
                 what="the re-exec")
        self.assertEqual(nofile_limits(sup.proc.pid), (self.hard, self.hard))
        os.kill(first["pid"], signal.SIGKILL)
        again = sup.wait_pid_change("plain", first["pid"])
        self.assertEqual(nofile_limits(again["pid"]), (300, self.hard))
        self.assertEqual(sup.terminate(), 0)


class TestNofileInProcess(unittest.TestCase):
    """spawn() itself, with our soft limit raised and the lowest free fd above
    the services' limit: the spare-fd path and its preexec fallback."""

    def setUp(self):
        import resource
        self.resource = resource
        self.saved = resource.getrlimit(resource.RLIMIT_NOFILE)
        if self.saved[1] < 1024:
            self.skipTest("the hard RLIMIT_NOFILE is too small")
        resource.setrlimit(resource.RLIMIT_NOFILE, (self.saved[1], self.saved[1]))
        self.addCleanup(resource.setrlimit, resource.RLIMIT_NOFILE, self.saved)
        self.addCleanup(respawn.set_service_nofile, None)
        # this process stands in for a supervisor, which puts back to default whatever
        # its launcher ignored (install_signals): a suite started with `&` from a
        # script has SIGINT and SIGQUIT ignored, and spawn() children inherit that
        for signum in (signal.SIGINT, signal.SIGQUIT, signal.SIGHUP, signal.SIGTTOU, signal.SIGTTIN):
            if signal.getsignal(signum) == signal.SIG_IGN:
                signal.signal(signum, signal.SIG_DFL)
                self.addCleanup(signal.signal, signum, signal.SIG_IGN)
        self.fds = []
        self.addCleanup(lambda: [os.close(fd) for fd in self.fds])

    def spawn_and_check(self, soft):
        prog = respawn.Program("t", {"command": ["sleep", "1000"]}, {})
        pid = respawn.spawn(prog, subprocess.DEVNULL, subprocess.DEVNULL)
        self.addCleanup(os.waitpid, pid, 0)
        self.addCleanup(os.kill, pid, signal.SIGKILL)
        self.assertEqual(nofile_limits(pid)[0], soft)
        self.assertEqual(nofile_limits(os.getpid()), (self.saved[1], self.saved[1]))
        st = proc_status(pid)
        self.assertEqual(int(st["SigBlk"], 16), 0)
        self.assertEqual(int(st["SigIgn"], 16), 0)

    def fill_fds_past(self, soft):
        while True:
            fd = os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
            self.fds.append(fd)
            if fd > soft + 10:
                return

    def test_spare_fds_below_the_limit(self):
        soft = max(64, max(self.fds_now()) + 20)
        respawn.set_service_nofile(soft)
        self.fill_fds_past(soft)
        self.assertEqual(len(respawn._SPARE_FDS), respawn.SPARE_FDS)
        self.spawn_and_check(soft)
        self.assertEqual(len(respawn._SPARE_FDS), respawn.SPARE_FDS)
        self.assertTrue(all(fd < soft for fd in respawn._SPARE_FDS))

    def test_no_spares_falls_back_to_the_child(self):
        soft = max(64, max(self.fds_now()) + 20)
        self.fill_fds_past(soft)
        respawn.set_service_nofile(soft)         # spares now land above the limit
        self.assertFalse(all(fd < soft for fd in respawn._SPARE_FDS))
        self.spawn_and_check(soft)

    @staticmethod
    def fds_now():
        return [int(n) for n in os.listdir("/proc/self/fd")]



def numbered_lines(path, size, seed=7):
    """Numbered lines of 1 to ~300 bytes up to size bytes; the bytes written."""
    import random as _random
    rng = _random.Random(seed)
    filler = b"abcdefghijklmnopqrstuvwxyz0123456789" * 9
    out, total, i = [], 0, 0
    while total < size:
        line = b"%08d %s\n" % (i, filler[:rng.randrange(0, 290)])
        out.append(line)
        total += len(line)
        i += 1
    data = b"".join(out)
    with open(path, "wb") as f:
        f.write(data)
    return data


def rotated_files(path):
    """The log and its backups, oldest first."""
    backups = sorted((int(n.rsplit(".", 1)[1]), n) for n in os.listdir(os.path.dirname(path))
                     if n.startswith(os.path.basename(path) + ".") and n.rsplit(".", 1)[1].isdigit())
    return [os.path.join(os.path.dirname(path), n) for _, n in reversed(backups)] + [path]


class TestSpliceOutput(unittest.TestCase):
    """A stream going to its log file moves by os.splice (3.10+) or by read and
    write; both keep every line intact and in order and rotate between lines."""

    MAXBYTES = 3 * 1024 * 1024

    def feed(self, splice, size=12 * 1000 * 1000, maxbytes=MAXBYTES, truncate_at=None):
        """Run one stream through a real (loop-less) supervisor's output path."""
        import select
        d = tempfile.mkdtemp(prefix="respawn-splice-")
        self.addCleanup(shutil.rmtree, d, True)
        log = os.path.join(d, "w.log")
        cfg = os.path.join(d, "c.ini")
        with open(cfg, "w") as f:
            f.write("[respawn]\nwatch_self = false\nsocket = %s/s.sock\n[program:w]\ncommand = true\n"
                    "stdout_logfile = %s\nstdout_logfile_maxbytes = %d\nstdout_logfile_backups = 50\n"
                    % (d, log, maxbytes))
        data = numbered_lines(os.path.join(d, "data"), size)
        sup = respawn.RespawnSupervisor(respawn.load_config(cfg), SCRIPT, ["-c", cfg, "run"])
        self.addCleanup(sup.selector.close)
        self.addCleanup(lambda: [sink.close() for sink in sup.sinks.values()])
        calls = []
        real = respawn.LogFile.splice_from

        def counted(sink, fd, count):
            n = real(sink, fd, count)
            calls.append(n)
            return n
        respawn.LogFile.splice_from = counted
        self.addCleanup(setattr, respawn.LogFile, "splice_from", real)
        r, w = os.pipe()
        cat = subprocess.Popen(["cat", os.path.join(d, "data")], stdout=w)
        self.addCleanup(cat.wait)
        os.close(w)
        pipe = respawn.Pipe(r, "w", "stdout")
        pipe.splice = splice
        sup.add_pipe(pipe)
        deadline = time.monotonic() + 60
        while r in sup.pipes and time.monotonic() < deadline:
            select.select([r], [], [], 1)
            sup.on_pipe(pipe)
            if truncate_at is not None and sup.sinks and sup.sinks[("w", "stdout")].size > truncate_at:
                os.truncate(log, 0)          # logrotate's copytruncate
                truncate_at = None
        self.assertNotIn(r, sup.pipes, "the stream did not end")
        return data, log, calls

    def check(self, data, log, maxbytes=MAXBYTES):
        files = rotated_files(log)
        got = b"".join(read_bytes(f) for f in files)
        self.assertEqual(len(got), len(data))
        self.assertTrue(got == data, "the log differs from what the service wrote")
        self.assertGreater(len(files), 3, "no rotation happened")
        for f in files[:-1]:
            body = read_bytes(f)
            self.assertTrue(body.endswith(b"\n"), "%s ends inside a line" % f)
            # a line begun in a file is ended in it: at most one line over
            self.assertLessEqual(len(body), maxbytes + 300, f)
            # within a read (1 MiB) and a line of the limit: not cut early
            self.assertGreater(len(body), maxbytes - respawn.READ_SIZE - 400, f)

    def test_splice_path(self):
        if not respawn.SPLICE:
            self.skipTest("os.splice needs Python 3.10 (this is %s): the read path "
                          "is tested on its own" % platform_version())
        data, log, calls = self.feed(splice=True)
        self.assertGreater(sum(n for n in calls if n), len(data) // 2, "most bytes by splice")
        self.check(data, log)

    def test_read_path(self):
        data, log, calls = self.feed(splice=False)
        self.assertEqual(calls, [])
        self.check(data, log)

    def test_unbounded_log_by_splice_is_the_stream(self):
        data, log, calls = self.feed(splice=respawn.SPLICE, maxbytes=0)
        self.assertEqual(read_bytes(log), data)
        self.assertEqual(rotated_files(log), [log])

    def test_splice_appends_after_a_copytruncate(self):
        if not respawn.SPLICE:
            self.skipTest("os.splice needs Python 3.10 (this is %s)" % platform_version())
        data, log, calls = self.feed(splice=True, maxbytes=0, truncate_at=4 * 1000 * 1000)
        got = read_bytes(log)
        # no hole of zeros where the old content was: what follows the truncation
        # starts the file, and it is a tail of the stream
        self.assertNotIn(b"\0", got)
        self.assertTrue(data.endswith(got) and 0 < len(got) < len(data))

    def test_service_writes_through_a_supervisor(self):
        # end to end, under this Python's own path (splice on 3.10+)
        sup = core_sup(self, """\
            [program:w]
            command = cat {dir}/data
            startsecs = 0
            autorestart = false
            stdout_logfile = {dir}/w.log
            stdout_logfile_maxbytes = 3MB
            stdout_logfile_backups = 50
            """)
        data = numbered_lines(sup.path("data"), 12 * 1000 * 1000)
        sup.start()
        sup.wait_state("w", "EXITED")
        self.check(data, sup.path("w.log"), maxbytes=3 * 1024 * 1024)
        self.assertEqual(sup.terminate(), 0)


class TestPrefixedOutput(unittest.TestCase):
    """The prefixed path: clean UTF-8 goes out as bytes in one replace, anything
    else is decoded with replacement as before; the tail keeps the last lines."""

    def test_prefixed_lines_tail_and_bad_utf8(self):
        sup = core_sup(self, """\
            [program:w]
            command = {py} -c "import sys, os; os.write(1, b''.join(b'line %d\\\\n' % i for i in range(3000)) + 'caf\\\\u00e9 \\\\u2603\\\\n'.encode() + b'bad \\\\xff\\\\xfe end\\\\n'); os.execv('/bin/sleep', ['sleep', '1000'])"
            startsecs = 0
            """)
        sup.start()
        sup.wait_log("w | bad", stream="stdout")
        out = sup.stdout().splitlines()
        mine = [l for l in out if l.startswith("w | ")]
        self.assertEqual(mine[:3000], ["w | line %d" % i for i in range(3000)])
        self.assertEqual(mine[3000], "w | caf\u00e9 \u2603")
        self.assertEqual(mine[3001], "w | bad \ufffd\ufffd end")
        log = sup.ctl("log", "w", "-n", "3")
        self.assertEqual(log.returncode, 0, log.stderr)
        self.assertEqual(log.stdout.splitlines()[-3:],
                         ["line 2999", "caf\u00e9 \u2603", "bad \ufffd\ufffd end"])
        self.assertEqual(sup.terminate(), 0)

    def test_tail_of_one_large_chunk(self):
        # one read of many lines: the tail keeps exactly the last TAIL_LINES
        sup = core_sup(self, """\
            [program:w]
            command = {py} -c "import os; os.write(1, b''.join(b'n%d\\\\n' % i for i in range(5000))); os.execv('/bin/sleep', ['sleep', '1000'])"
            startsecs = 0
            """)
        sup.start()
        sup.wait_log("w | n4999", stream="stdout")
        log = sup.ctl("log", "w", "-n", str(respawn.TAIL_LINES))
        lines = log.stdout.splitlines()
        self.assertEqual(lines[-respawn.TAIL_LINES:],
                         ["n%d" % i for i in range(5000 - respawn.TAIL_LINES, 5000)])
        self.assertEqual(sup.terminate(), 0)


def read_bytes(path):
    with open(path, "rb") as f:
        return f.read()


def platform_version():
    return "%d.%d" % sys.version_info[:2]


# ---------------------------------------------------------------------------
# Operations (issue 14): metrics, on_change hooks, systemd, journald, recipes
# ---------------------------------------------------------------------------

OPS_HEADER = "[respawn]\nwatch_self = false\n"


def http_get(port, path="/metrics", method="GET", host="127.0.0.1", timeout=DEADLINE):
    """(status code, headers dict, body bytes) of one plain HTTP request."""
    with socket.create_connection((host, port), timeout=timeout) as s:
        s.sendall(("%s %s HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n" % (method, path)).encode())
        data = b""
        while True:
            chunk = s.recv(65536)
            if not chunk:
                break
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode().split("\r\n")
    headers = dict(l.split(": ", 1) for l in lines[1:] if ": " in l)
    return int(lines[0].split()[1]), headers, body


def parse_exposition(text):
    """{(name, frozenset(labels)): value} of a Prometheus text exposition, and
    {name: type} from its TYPE lines; AssertionError on a malformed line."""
    samples, types = {}, {}
    line_re = re.compile(r'([a-zA-Z_:][a-zA-Z0-9_:]*)(\{(.*)\})? (\S+)$')
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split(" ", 3)
            types[name] = kind
            continue
        if line.startswith("#") or not line:
            continue
        m = line_re.match(line)
        assert m, "not an exposition line: %r" % line
        labels = frozenset(re.findall(r'(\w+)="((?:[^"\\]|\\.)*)"', m.group(3) or ""))
        samples[(m.group(1), labels)] = float(m.group(4))
    return samples, types


def promtool():
    """The path of Prometheus' promtool, installing Debian's prometheus if we can."""
    if not shutil.which("promtool") and shutil.which("apt-get") and os.geteuid() == 0:
        subprocess.run("apt-get install -y -qq prometheus || (apt-get update -qq && "
                       "apt-get install -y -qq prometheus)", shell=True, timeout=900,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                       env=dict(os.environ, DEBIAN_FRONTEND="noninteractive"))
    return shutil.which("promtool")


SNAPSHOT = {"supervisor": {"pid": 1, "version": "9.9.9", "started": 1700000000.5, "reexecs": 2,
                           "dropped_bytes": 7},
            "services": [
                {"name": "web", "state": "RUNNING", "started": 1700000001.25, "restarts": 3,
                 "ready": True, "healthy": True, "failures": 0, "dropped_bytes": 42, "ok": True},
                {"name": 'odd"na\\me', "state": "FATAL", "started": None, "restarts": 0,
                 "ready": False, "healthy": False, "failures": 4, "ok": False}]}


class TestMetricsFormat(unittest.TestCase):
    def test_the_exposition_follows_prometheus_naming(self):
        text = respawn.format_metrics(SNAPSHOT)
        samples, types = parse_exposition(text)
        s = lambda name, **labels: samples[(name, frozenset(labels.items()))]
        self.assertEqual(s("respawn_supervisor_up"), 1)
        self.assertEqual(s("respawn_build_info", version="9.9.9",
                           python="%d.%d.%d" % sys.version_info[:3]), 1)
        self.assertEqual(s("respawn_supervisor_start_time_seconds"), 1700000000.5)
        self.assertEqual(s("respawn_supervisor_reexecs_total"), 2)
        self.assertEqual(s("respawn_supervisor_log_dropped_bytes_total"), 7)
        self.assertEqual(s("respawn_services", state="RUNNING"), 1)
        self.assertEqual(s("respawn_services", state="FATAL"), 1)
        self.assertEqual(s("respawn_services", state="BACKOFF"), 0)
        self.assertEqual(s("respawn_service_up", service="web"), 1)
        self.assertEqual(s("respawn_service_up", service='odd\\"na\\\\me'), 0)
        self.assertEqual(s("respawn_service_state", service="web", state="RUNNING"), 1)
        self.assertEqual(s("respawn_service_state", service="web", state="FATAL"), 0)
        self.assertEqual(s("respawn_service_restarts_total", service="web"), 3)
        self.assertEqual(s("respawn_service_start_time_seconds", service="web"), 1700000001.25)
        self.assertEqual(s("respawn_service_ready", service="web"), 1)
        self.assertEqual(s("respawn_service_healthy", service="web"), 1)
        self.assertEqual(s("respawn_service_healthy", service='odd\\"na\\\\me'), 0)
        self.assertEqual(s("respawn_service_ok", service="web"), 1)
        self.assertEqual(s("respawn_service_ok", service='odd\\"na\\\\me'), 0)
        self.assertEqual(s("respawn_output_dropped_bytes_total", service="web"), 42)
        # a service never started has no start time (not a 1970 one)
        self.assertNotIn(("respawn_service_start_time_seconds",
                          frozenset({("service", 'odd\\"na\\\\me')})), samples)
        for name, kind in types.items():
            self.assertTrue(name.startswith("respawn_"), name)
            self.assertEqual(name.endswith("_total"), kind == "counter", name)
        self.assertEqual({n for n, _ in samples}, set(types))

    def test_dropped_output_only_when_the_supervisor_counts_it(self):
        snap = json.loads(json.dumps(SNAPSHOT))
        del snap["services"][0]["dropped_bytes"]
        self.assertNotIn("respawn_output_dropped_bytes_total", respawn.format_metrics(snap))

    def test_down_is_still_an_exposition(self):
        samples, _ = parse_exposition(respawn.format_metrics(None, up=False))
        self.assertEqual(samples, {("respawn_supervisor_up", frozenset()): 0})

    def test_promtool_accepts_the_exposition(self):
        tool = promtool()
        if not tool:
            self.skipTest("promtool (Debian package prometheus) cannot be installed here")
        p = subprocess.run([tool, "check", "metrics"], input=respawn.format_metrics(SNAPSHOT),
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=60)
        self.assertEqual((p.returncode, p.stdout), (0, ""))

    def test_metrics_addresses(self):
        parse = respawn.parse_metrics_address
        self.assertEqual(parse("9101"), ("127.0.0.1", 9101))
        self.assertEqual(parse("0.0.0.0:9101"), ("0.0.0.0", 9101))
        self.assertEqual(parse("[::1]:9101"), ("::1", 9101))
        self.assertEqual(parse("localhost:80"), ("127.0.0.1", 80))
        for bad, why in (("127.0.0.1:0", "out of range"), ("127.0.0.1:65536", "out of range"),
                         ("example.com:80", "not an IP address"), ("1.2.3:80", "not an IP address"),
                         ("::1:80", "in brackets"), ("127.0.0.1:http", "expected HOST:PORT"),
                         ("", "expected HOST:PORT"), ("127.0.0.1:\u0661\u0662", "expected HOST:PORT")):
            with self.assertRaises(ValueError, msg=bad) as cm:
                parse(bad)
            self.assertIn(why, str(cm.exception), bad)


class OpsTestLoop:
    """The loop interface the operations parts take (call_at, cancel_timer,
    watch_fd, unwatch_fd, watch_helper), over a selector of the test's own."""

    def __init__(self, test):
        self.selector = selectors.DefaultSelector()
        test.addCleanup(self.selector.close)
        self.timers = respawn.Timers()
        self.watcher = respawn.make_watcher(self.selector, False)
        test.addCleanup(self.watcher.close)
        self.helpers = {}

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
        self.helpers[pid] = purpose
        self.watcher.watch(pid, lambda p, s: (self.helpers.pop(p, None), callback(p, s)))

    def turn(self, timeout=0.05):
        for key, mask in self.selector.select(timeout):
            key.data(mask)
        self.watcher.sigchld()
        self.timers.run_due(respawn.monotonic())


class TestMetricsServerUnit(unittest.TestCase):
    """The endpoint alone, in a loop of the test's own (no supervisor)."""

    def serve(self, body):
        loop = OpsTestLoop(self)
        sel, timers = loop.selector, loop.timers
        logs = []
        port = free_port()
        server = respawn.MetricsServer(("127.0.0.1", port), loop, lambda: body,
                                       lambda level, msg: logs.append((level, msg)))
        self.addCleanup(server.close_all)
        return sel, timers, server, port

    @staticmethod
    def turn(sel, timers, timeout=0.05):
        for key, mask in sel.select(timeout):
            key.data(mask)
        timers.run_due(respawn.monotonic())

    def test_a_10_mb_scrape_to_a_slow_reader_never_blocks_the_loop(self):
        body = "x" * (10 * 1024 * 1024)
        sel, timers, server, port = self.serve(body)
        client = socket.create_connection(("127.0.0.1", port), timeout=DEADLINE)
        self.addCleanup(client.close)
        client.sendall(b"GET /metrics HTTP/1.1\r\n\r\n")
        # the client reads nothing: each turn of the loop returns (a blocking send
        # would hang here), with most of the answer still waiting in the server
        for _ in range(20):
            self.turn(sel, timers)
        pending = [c for c in server.conns.values() if c.out]
        self.assertTrue(pending and len(pending[0].out) > 1024 * 1024, "the answer should wait")
        got = b""
        client.setblocking(False)
        deadline = time.monotonic() + DEADLINE
        while not got.endswith(b"x" * 64) or len(got) < len(body) + 100:
            self.assertLess(time.monotonic(), deadline, "the answer never came whole")
            self.turn(sel, timers, 0.01)
            try:
                chunk = client.recv(1 << 20)
            except BlockingIOError:
                continue
            if not chunk:
                break
            got += chunk
        head, _, rest = got.partition(b"\r\n\r\n")
        self.assertIn(b"Content-Length: %d" % len(body), head)
        self.assertEqual(len(rest), len(body))

    def test_a_slow_client_is_cut_at_its_deadline(self):
        sel, timers, server, port = self.serve("m 1\n")
        old = respawn.METRICS_DEADLINE
        respawn.METRICS_DEADLINE = 0.3
        self.addCleanup(setattr, respawn, "METRICS_DEADLINE", old)
        client = socket.create_connection(("127.0.0.1", port), timeout=DEADLINE)
        self.addCleanup(client.close)
        client.sendall(b"GET /metr")        # and never the rest
        wait_for(lambda: (self.turn(sel, timers), server.conns)[1], what="the connection")
        wait_for(lambda: (self.turn(sel, timers), not server.conns)[1], what="the deadline")
        self.assertEqual(client.recv(100), b"")


class TestMetricsEndpoint(unittest.TestCase):
    def start(self, extra=""):
        self.port = free_port()
        sup = Sup(self, OPS_HEADER + "metrics = 127.0.0.1:%d\n%s\n[program:a]\ncommand = sleep 1000\n"
                  "startsecs = 0\n" % (self.port, extra)).start()
        sup.wait_state("a", "RUNNING")
        return sup

    def test_get_metrics_healthz_and_nothing_else(self):
        sup = self.start()
        code, headers, body = http_get(self.port)
        self.assertEqual(code, 200)
        self.assertEqual(headers["Content-Type"], "text/plain; version=0.0.4; charset=utf-8")
        samples, _ = parse_exposition(body.decode())
        self.assertEqual(samples[("respawn_service_up", frozenset({("service", "a")}))], 1)
        # the faults section's counts (issue 12) are exported
        self.assertEqual(samples[("respawn_output_dropped_bytes_total", frozenset({("service", "a")}))], 0)
        self.assertEqual(samples[("respawn_supervisor_log_dropped_bytes_total", frozenset())], 0)
        self.assertEqual(http_get(self.port, "/healthz")[::2], (200, b"ok\n"))
        self.assertEqual(http_get(self.port, "/metrics?x=1")[0], 200)
        self.assertEqual(http_get(self.port, "/metrics", "HEAD")[::2], (200, b""))
        self.assertEqual(http_get(self.port, "/")[0], 404)
        self.assertEqual(http_get(self.port, "/admin")[0], 404)
        for method in ("POST", "PUT", "DELETE"):
            code, headers, _ = http_get(self.port, "/metrics", method)
            self.assertEqual(code, 405, method)
            self.assertEqual(headers["Allow"], "GET, HEAD")
        with socket.create_connection(("127.0.0.1", self.port), timeout=DEADLINE) as s:
            s.sendall(b"garbage\r\n\r\n")
            self.assertIn(b" 400 ", s.recv(100))
        # read-only: the service is untouched by all that
        self.assertEqual(sup.svc("a")["restarts"], 0)
        # a kill shows in the next scrape
        os.kill(sup.svc("a")["pid"], signal.SIGKILL)
        wait_for(lambda: parse_exposition(http_get(self.port)[2].decode())[0].get(
            ("respawn_service_restarts_total", frozenset({("service", "a")}))) == 1,
            what="the restart in the metrics")
        self.assertEqual(sup.terminate(), 0)

    def test_loopback_by_default(self):
        sup = Sup(self, OPS_HEADER + "metrics = %d\n[program:a]\ncommand = sleep 1000\n" % free_port())
        self.assertEqual(respawn.load_config(sup.config).settings["metrics"][0], "127.0.0.1")

    def test_huge_slow_and_too_many_clients_do_not_slow_supervision(self):
        sup = self.start()
        idle = []
        self.addCleanup(lambda: [s.close() for s in idle])
        for _ in range(respawn.METRICS_MAX_CLIENTS):
            idle.append(socket.create_connection(("127.0.0.1", self.port), timeout=DEADLINE))
            idle[-1].sendall(b"GET /met")       # slow: the rest never comes
        # one more is refused at once, not queued behind them
        def refused():
            try:
                return http_get(self.port)[0] == 503
            except ConnectionResetError:      # closed before our request was read
                return True
        wait_for(refused, what="a 503 for one client too many")
        # 10 MB of request: cut at the request limit, however fast it comes
        big = socket.create_connection(("127.0.0.1", self.port), timeout=DEADLINE)
        self.addCleanup(big.close)
        sent, cut = 0, False
        try:
            while sent < 10 * 1024 * 1024:
                sent += big.send(b"X" * 65536)
        except socket.timeout:
            self.fail("the endpoint stopped reading but kept the connection open")
        except OSError:
            cut = True
        # supervision goes on meanwhile: a kill is answered by a restart, status answers
        first = sup.svc("a")
        os.kill(first["pid"], signal.SIGKILL)
        sup.wait_pid_change("a", first["pid"])
        self.assertEqual(sup.ctl("status").returncode, 0)
        # the 10 MB sender was cut off at the limit (a 431, then the connection closed)
        self.assertTrue(cut, "10 MB of request were all taken in")
        # the idle ones are closed at their deadline, and scrapes work again
        for s in idle:
            s.settimeout(respawn.METRICS_DEADLINE + DEADLINE)
            try:
                self.assertEqual(s.recv(100), b"")
            except ConnectionResetError:
                pass
        wait_for(lambda: http_get(self.port)[0] == 200, what="scrapes after the deadline")
        self.assertEqual(sup.terminate(), 0)

    def test_a_port_in_use_is_one_line_and_supervision_goes_on(self):
        blocker = socket.socket()
        self.addCleanup(blocker.close)
        blocker.bind(("127.0.0.1", 0))
        blocker.listen(1)
        port = blocker.getsockname()[1]
        sup = Sup(self, OPS_HEADER + "metrics = 127.0.0.1:%d\n[program:a]\ncommand = sleep 1000\n"
                  "startsecs = 0\n" % port).start()
        sup.wait_state("a", "RUNNING")
        lines = [l for l in sup.stderr().splitlines() if "metrics" in l]
        self.assertEqual(len(lines), 1, lines)
        self.assertIn("metrics: cannot listen on 127.0.0.1:%d: Address already in use; "
                      "supervising without metrics" % port, lines[0])
        self.assertEqual(sup.terminate(), 0)
        # and `check` says so, at the key's line (the port is not this config's supervisor's)
        p = sup.ctl("check")
        self.assertEqual(p.returncode, 2, p.stdout)
        self.assertIn("%s:4: metrics: cannot listen on 127.0.0.1:%d: Address already in use"
                      % (sup.config, port), p.stdout)

    def test_check_accepts_the_port_its_own_supervisor_holds(self):
        sup = self.start()
        p = sup.ctl("check")
        self.assertEqual(p.returncode, 0, p.stdout + p.stderr)
        # also after an edit of `socket =` not reloaded yet: the supervisor holding the
        # port is found by its lock, not by the socket the file names now
        with open(sup.config) as f:
            text = f.read()
        self.assertIn("socket = %s\n" % sup.sock, text)
        with open(sup.config, "w") as f:
            f.write(text.replace("socket = %s\n" % sup.sock, "socket = %s.new\n" % sup.sock))
        p = sup.ctl("check")
        self.assertEqual(p.returncode, 0, p.stdout + p.stderr)
        self.assertEqual(sup.terminate(), 0)

    def test_reload_moves_the_endpoint(self):
        sup = self.start()
        old, new = self.port, free_port()
        with open(sup.config) as f:
            text = f.read()
        sup.write_config(text.replace(str(old), str(new)).replace("socket = %s\n" % sup.sock, ""))
        self.assertEqual(sup.ctl("reload").returncode, 0)
        self.assertEqual(http_get(new)[0], 200)
        with self.assertRaises(OSError):
            http_get(old)
        self.assertEqual(sup.terminate(), 0)

    def test_reexec_keeps_the_endpoint(self):
        sup = self.start()
        p = sup.ctl("reexec")
        self.assertEqual(p.returncode, 0, p.stdout + p.stderr)
        samples, _ = parse_exposition(wait_for(lambda: (lambda r: r[2].decode() if r[0] == 200 else None)(
            http_get(self.port)), what="metrics after the re-exec"))
        self.assertEqual(samples[("respawn_supervisor_reexecs_total", frozenset())], 1)
        self.assertEqual(sup.terminate(), 0)


class TestMetricsCheck(unittest.TestCase):
    def test_bad_metrics_values_are_check_errors_at_their_line(self):
        for value, why in (("127.0.0.1:70000", "port 70000 is out of range (1 to 65535)"),
                           ("nohost:9100", "'nohost' is not an IP address"),
                           ("9100x", "expected HOST:PORT or PORT"),
                           # an address this machine does not have
                           ("192.0.2.1:9100", "metrics: cannot listen on 192.0.2.1:9100:")):
            code, out, path = run_check(self, "[respawn]\nloglevel = info\nmetrics = %s\n"
                                        "[program:a]\ncommand = sleep 1\n" % value)
            self.assertEqual(code, 2, out)
            self.assertIn("%s:3: " % path, out)
            self.assertIn(why, out)

    def test_metrics_command(self):
        sup = Sup(self, OPS_HEADER + "[program:a]\ncommand = sleep 1000\nstartsecs = 0\n").start()
        sup.wait_state("a", "RUNNING")
        p = sup.ctl("metrics")
        self.assertEqual(p.returncode, 0, p.stderr)
        samples, _ = parse_exposition(p.stdout)
        self.assertEqual(samples[("respawn_service_up", frozenset({("service", "a")}))], 1)
        self.assertEqual(samples[("respawn_supervisor_up", frozenset())], 1)
        self.assertEqual(sup.terminate(), 0)
        # no supervisor: still an exposition on stdout (for a textfile collector), exit 1
        p = sup.ctl("metrics")
        self.assertEqual(p.returncode, 1)
        self.assertEqual(parse_exposition(p.stdout)[0], {("respawn_supervisor_up", frozenset()): 0})
        self.assertIn("no supervisor is running", p.stderr)


# -- on_change ------------------------------------------------------------------

HOOK_LOG = "sh -c 'echo \"$RESPAWN_SERVICE $RESPAWN_PREVIOUS $RESPAWN_STATE $RESPAWN_REASON\" >> {dir}/hooks'"


class TestOnChange(unittest.TestCase):
    def hooks(self, sup):
        return read_or_empty(sup.path("hooks")).splitlines()

    def test_each_change_runs_the_hook_with_its_environment(self):
        sup = Sup(self, OPS_HEADER + "on_change = %s\n[program:a]\ncommand = sleep 1000\nstartsecs = 0.2\n"
                  "[program:bad]\ncommand = sh -c 'exit 3'\nstartretries = 0\n" % HOOK_LOG).start()
        wait_for(lambda: "a STARTING RUNNING " in self.hooks(sup)
                 and any(l.startswith("bad STARTING FATAL exit 3") for l in self.hooks(sup)),
                 what="the hooks of a and bad")
        self.assertIn("a STOPPED STARTING ", self.hooks(sup))
        os.kill(sup.svc("a")["pid"], signal.SIGKILL)
        wait_for(lambda: [l for l in self.hooks(sup) if l.startswith("a RUNNING STARTING ")
                          and "killed by SIGKILL" in l], what="the restart's hook, with its reason")
        sup.wait_state("a", "RUNNING")
        sup.ctl("stop", "a")
        wait_for(lambda: "a STOPPING STOPPED stopped" in self.hooks(sup), what="the stop's hooks")
        self.assertIn("a RUNNING STOPPING stopped", self.hooks(sup))
        self.assertEqual(sup.terminate(), 0)

    def test_output_and_failures_are_logged_and_never_retried(self):
        sup = Sup(self, OPS_HEADER + "on_change = sh -c 'echo said $RESPAWN_STATE; echo >> {dir}/runs; exit 7'\n"
                  "[program:a]\ncommand = sleep 1000\nstartsecs = 0\n").start()
        sup.wait_log("on_change (a RUNNING): said RUNNING")
        sup.wait_log("on_change for a RUNNING failed (exit 7); not retried")
        # the two hooks may run at once: each has written its run once both have ended
        sup.wait_log("on_change for a STARTING failed (exit 7); not retried")
        holds(lambda: read_or_empty(sup.path("runs")).count("\n") == 2, 1.0, "one run per change")
        self.assertEqual(sup.terminate(), 0)

    def test_a_slow_hook_never_blocks_supervision_and_few_run_at_once(self):
        config = OPS_HEADER + ("on_change = sh -c 'echo + >> {dir}/seq; sleep 1; echo - >> {dir}/seq'\n")
        for i in range(5):
            config += "[program:s%d]\ncommand = sleep 1000\nstartsecs = 0\n" % i
        sup = Sup(self, config).start()
        for i in range(5):
            sup.wait_state("s%d" % i, "RUNNING")
        # every hook slot is busy with a 1 s hook, and a kill is still answered at once
        first = sup.svc("s0")
        os.kill(first["pid"], signal.SIGKILL)
        sup.wait_pid_change("s0", first["pid"])
        # 10 changes + the kill's, each run, at most HOOK_MAX_RUNNING at once
        wait_for(lambda: read_or_empty(sup.path("seq")).count("-") >= 12, timeout=DEADLINE * 2,
                 what="every hook to run")
        depth = most = 0
        for mark in read_or_empty(sup.path("seq")).split():
            depth += 1 if mark == "+" else -1
            most = max(most, depth)
        self.assertLessEqual(most, respawn.HOOK_MAX_RUNNING)
        self.assertGreater(most, 1)
        self.assertEqual(sup.terminate(), 0)

    def test_a_hook_running_across_a_reexec_is_reaped_by_the_new_image(self):
        sup = Sup(self, OPS_HEADER + "on_change = sh -c 'echo $$ >> {dir}/pids; sleep 2'\n"
                  "[program:a]\ncommand = sleep 1000\nstartsecs = 0\n").start()
        sup.wait_state("a", "RUNNING")
        wait_for(lambda: read_or_empty(sup.path("pids")).count("\n") >= 2, what="the hooks")
        hooks = [int(x) for x in read_or_empty(sup.path("pids")).split()]
        self.assertTrue(any(pid_alive(p) for p in hooks), "the hooks ended before the re-exec")
        self.assertEqual(sup.ctl("reexec").returncode, 0)
        wait_for(lambda: not any(pid_alive(p) for p in hooks), what="the hooks to end")
        wait_for(lambda: not zombies_of(sup.proc.pid), what="the hooks to be reaped")
        # and the new image runs hooks of its own
        os.kill(sup.svc("a")["pid"], signal.SIGKILL)
        wait_for(lambda: read_or_empty(sup.path("pids")).count("\n") >= 4, what="hooks after the re-exec")
        self.assertEqual(sup.terminate(), 0)

    def test_hooks_running_and_queued_at_a_reexec_all_run_once_after_it(self):
        # every hook waits for the test's go: at the re-exec, HOOK_MAX_RUNNING run
        # and the rest are queued; each must run once, with its environment, and
        # the running ones be read, reaped and told by the new image
        config = OPS_HEADER + ("on_change = sh -c 'echo \"$RESPAWN_SERVICE $RESPAWN_PREVIOUS "
                               "$RESPAWN_STATE\" >> {dir}/hooks; while [ ! -e {dir}/go ]; do "
                               "sleep 0.05; done; echo said $RESPAWN_SERVICE; exit 7'\n")
        names = ["s%d" % i for i in range(6)]
        for name in names:
            config += "[program:%s]\ncommand = sleep 1000\nstartsecs = 0\n" % name
        sup = Sup(self, config).start()
        self.addCleanup(lambda: os.path.exists(sup.path("go")) or write_file(sup.path("go"), ""))
        for name in names:
            sup.wait_state(name, "RUNNING")
        wait_for(lambda: len(self.hooks(sup)) >= respawn.HOOK_MAX_RUNNING, what="the first hooks")
        self.assertEqual(sup.ctl("reexec").returncode, 0)
        sup.wait_log("re-executed: version")
        self.assertEqual(len(self.hooks(sup)), respawn.HOOK_MAX_RUNNING, "the queue did not wait")
        write_file(sup.path("go"), "")
        want = sorted(["%s STOPPED STARTING" % n for n in names] + ["%s STARTING RUNNING" % n for n in names])
        wait_for(lambda: sorted(self.hooks(sup)) == want or len(self.hooks(sup)) > len(want),
                 what="every change's hook")
        self.assertEqual(sorted(self.hooks(sup)), want)
        for line in want:
            name, _, state = line.split()
            sup.wait_log("on_change (%s %s): said %s" % (name, state, name))
            sup.wait_log("on_change for %s %s failed (exit 7); not retried" % (name, state))
        wait_for(lambda: not zombies_of(sup.proc.pid), what="the hooks to be reaped")
        holds(lambda: len(self.hooks(sup)) == len(want), 0.5, "each hook run once")
        self.assertEqual(sup.terminate(), 0)

    def test_a_missing_command_is_a_check_error(self):
        code, out, path = run_check(self, "[respawn]\non_change = /nonexistent/alert --now\n"
                                    "[program:a]\ncommand = sleep 1\n")
        self.assertEqual(code, 2, out)
        self.assertIn("%s:2: on_change: command '/nonexistent/alert' not found" % path, out)
        code, out, path = run_check(self, "[respawn]\n\non_change = no-such-alert-tool\n"
                                    "[program:a]\ncommand = sleep 1\n")
        self.assertIn("%s:3: on_change: command 'no-such-alert-tool' not found in PATH" % path, out)


class TestHookRunnerUnit(unittest.TestCase):
    """The queue bound, the drop notice and the timeout, with a selector of our own."""

    def runner(self, command):
        loop = OpsTestLoop(self)
        logs = []
        run = respawn.HookRunner(command, loop, lambda l, m: logs.append((l, m)))
        self.addCleanup(lambda: [kill_group(pid) for pid in list(run.running)])
        self.addCleanup(run.close)
        return run, logs, loop.helpers, loop.turn

    def test_overflow_drops_the_oldest_and_says_so_once(self):
        run, logs, helpers, turn = self.runner(("sleep", "1000"))
        total = respawn.HOOK_MAX_RUNNING + respawn.HOOK_MAX_QUEUED + 40
        for i in range(total):
            run.changed("s%d" % i, "RUNNING", "STARTING", "")
        self.assertEqual(len(run.running), respawn.HOOK_MAX_RUNNING)
        self.assertEqual(set(helpers), set(run.running))
        self.assertEqual(len(run.queue), respawn.HOOK_MAX_QUEUED)
        self.assertEqual(run.queue[-1]["RESPAWN_SERVICE"], "s%d" % (total - 1))
        self.assertEqual(run.dropped, 40)
        warned = [m for l, m in logs if "dropping the oldest" in m]
        self.assertEqual(len(warned), 1, logs)

    def test_a_hook_that_hangs_is_killed_at_its_timeout(self):
        old = respawn.HOOK_TIMEOUT
        respawn.HOOK_TIMEOUT = 0.3
        self.addCleanup(setattr, respawn, "HOOK_TIMEOUT", old)
        run, logs, helpers, turn = self.runner(("sleep", "1000"))
        run.changed("a", "FATAL", "STARTING", "exit 1")
        wait_for(lambda: (turn(), not run.running)[1], what="the hook to be killed")
        text = "\n".join(m for l, m in logs)
        self.assertIn("on_change for a FATAL still running after 0.3s: killed", text)
        self.assertIn("on_change for a FATAL failed (killed by SIGKILL); not retried", text)
        self.assertEqual(helpers, {})


# -- systemd and journald -------------------------------------------------------

class SystemdListener:
    """A fake $NOTIFY_SOCKET: every datagram the supervisor sends, as dicts."""

    def __init__(self, test, sup):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        test.addCleanup(self.sock.close)
        path = sup.path("notify.sock")
        self.sock.bind(path)
        sup.env["NOTIFY_SOCKET"] = path
        self.messages = []

    def pump(self):
        self.sock.setblocking(False)
        while True:
            try:
                data = self.sock.recv(65536).decode()
            except BlockingIOError:
                return self.messages
            self.messages.append(dict(l.split("=", 1) for l in data.splitlines() if "=" in l))

    def wait(self, key, value=None, after=0, what=None):
        def found():
            for i, m in enumerate(self.pump()[after:], after):
                if key in m and (value is None or m[key] == value):
                    return i + 1
            return None
        index = wait_for(found, what=what or "%s=%s from the supervisor" % (key, value))
        return index, self.messages[index - 1]


class TestSystemdOps(unittest.TestCase):
    def test_a_notify_socket_nobody_reads_never_blocks_the_loop(self):
        # the peer's queue holds max_dgram_qlen (10) datagrams: watchdog pings every
        # 10 ms fill it at once, and a blocking send froze the supervisor there
        sup = Sup(self, OPS_HEADER + "[program:a]\ncommand = sleep 1000\nstartsecs = 0\n")
        SystemdListener(self, sup)                     # bound, never read
        sup.env["WATCHDOG_USEC"] = "20000"
        sup.start()
        first = sup.wait_state("a", "RUNNING")
        holds(lambda: sup.answers() is not None, 1.0, "the supervisor stopped answering")
        os.kill(first["pid"], signal.SIGKILL)
        sup.wait_pid_change("a", first["pid"])
        self.assertEqual(sup.terminate(), 0)

    def test_ready_waits_for_every_autostart_service(self):
        sup = Sup(self, OPS_HEADER + "[program:slow]\ncommand = sleep 1000\nstartsecs = 1.5\n"
                  "[program:bad]\ncommand = sh -c 'exit 3'\nstartretries = 0\n"
                  "[program:after]\ncommand = sleep 1000\nrequires = bad\n"
                  "[program:manual]\ncommand = sleep 1000\nautostart = false\n")
        listener = SystemdListener(self, sup)
        sup.start(wait=False)
        i, ready = listener.wait("READY", "1")
        # not before: the slow one is RUNNING, the bad one FATAL, its dependant stuck
        wait_for(lambda: sup.answers(), what="status")
        self.assertEqual(sup.svc("slow")["state"], "RUNNING")
        self.assertEqual(ready["MAINPID"], str(sup.proc.pid))
        self.assertEqual(ready["STATUS"], "1 running; failed: after (waiting for bad), bad (FATAL)")
        self.assertTrue(any("starting: slow" in m.get("STATUS", "") for m in listener.messages[:i - 1]),
                        listener.messages)
        self.assertEqual(sup.terminate(), 0)

    def test_reload_stop_and_a_rejected_reload(self):
        sup = Sup(self, OPS_HEADER + "[program:a]\ncommand = sleep 1000\nstartsecs = 0\n")
        listener = SystemdListener(self, sup)
        sup.start()
        i, _ = listener.wait("READY", "1")
        before = time.clock_gettime(time.CLOCK_MONOTONIC) * 1e6
        self.assertEqual(sup.ctl("reload").returncode, 0)
        i, reloading = listener.wait("RELOADING", "1", after=i)
        self.assertGreaterEqual(int(reloading["MONOTONIC_USEC"]), before)
        self.assertLessEqual(int(reloading["MONOTONIC_USEC"]), time.clock_gettime(time.CLOCK_MONOTONIC) * 1e6)
        i, _ = listener.wait("READY", "1", after=i)
        # ExecReload=python3 respawn.py reload: a rejected config fails the reload
        with open(sup.config, "a") as f:
            f.write("[program:broken]\n")
        p = sup.ctl("reload")
        self.assertEqual(p.returncode, 1, p.stdout)
        i, _ = listener.wait("RELOADING", "1", after=i)
        i, again = listener.wait("READY", "1", after=i)
        self.assertIn("reload rejected", again["STATUS"])
        sup.proc.send_signal(signal.SIGTERM)
        listener.wait("STOPPING", "1", after=i)
        self.assertEqual(sup.proc.wait(DEADLINE), 0)

    def test_watchdog_at_half_its_period_across_a_reexec(self):
        sup = Sup(self, OPS_HEADER + "[program:a]\ncommand = sleep 1000\nstartsecs = 0\n",
                  env={"WATCHDOG_USEC": "400000"})
        listener = SystemdListener(self, sup)
        sup.start()
        i, _ = listener.wait("WATCHDOG", "1")
        i, _ = listener.wait("WATCHDOG", "1", after=i)
        self.assertEqual(sup.ctl("reexec").returncode, 0)
        mark = len(listener.pump())
        i, _ = listener.wait("WATCHDOG", "1", after=mark, what="WATCHDOG=1 from the new image")
        listener.wait("WATCHDOG", "1", after=i)
        # the service does not inherit our watchdog
        pid = sup.svc("a")["pid"]
        with open("/proc/%d/environ" % pid, "rb") as f:
            self.assertNotIn(b"WATCHDOG_USEC=", f.read())
        self.assertEqual(sup.terminate(), 0)

    def test_no_watchdog_for_another_pid(self):
        sup = Sup(self, OPS_HEADER + "[program:a]\ncommand = sleep 1000\nstartsecs = 0.5\n",
                  env={"WATCHDOG_USEC": "100000", "WATCHDOG_PID": "1"})
        listener = SystemdListener(self, sup)
        sup.start()
        listener.wait("READY", "1")
        self.assertFalse([m for m in listener.pump() if "WATCHDOG" in m], listener.messages)
        self.assertEqual(sup.terminate(), 0)


class TestJournald(unittest.TestCase):
    def start(self, matching):
        sup = Sup(self, OPS_HEADER + "[program:a]\ncommand = sleep 1000\nstartsecs = 0\n"
                  "[program:bad]\ncommand = sh -c 'exit 3'\nstartretries = 0\n")
        open(sup.err_path, "ab").close()
        st = os.stat(sup.err_path)
        sup.env["JOURNAL_STREAM"] = "%d:%d" % (st.st_dev, st.st_ino) if matching else "1:1"
        sup.start()
        sup.wait_state("bad", "FATAL")
        return sup

    def test_priorities_and_no_timestamp_under_the_journal(self):
        sup = self.start(True)
        lines = sup.stderr().splitlines()
        self.assertTrue(lines[0].startswith("<6>respawn %s (pid " % respawn.__version__), lines[0])
        self.assertIn("<3>bad: exit 3; gave up after 1 failed start", lines)
        self.assertTrue(all(re.match(r"<[0-7]>", l) for l in lines), lines)
        self.assertEqual(sup.terminate(), 0)

    def test_plain_lines_when_stderr_is_not_the_journal(self):
        sup = self.start(False)
        lines = sup.stderr().splitlines()
        self.assertTrue(all(re.match(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d{3} ", l) for l in lines), lines)
        self.assertEqual(sup.terminate(), 0)


# -- the README's recipes ---------------------------------------------------------

def readme_recipe(name):
    """The code block after `<!-- recipe: NAME -->` in README.md."""
    with open(os.path.join(HERE, "README.md")) as f:
        text = f.read()
    marker = "<!-- recipe: %s -->" % name
    assert marker in text, "README.md has no recipe %s" % name
    block = text.split(marker, 1)[1].split("```", 2)[1]
    return block.split("\n", 1)[1]          # without the ```lang line


def app_paths(text, sup):
    """A recipe's paths, made this test's."""
    paths = {"/opt/respawn/respawn.py": SCRIPT, "/opt/respawn/respawn.ini": sup.config,
             "/app/respawn.py": SCRIPT, "/app/respawn.ini": sup.config}
    return re.sub(r"(?:/usr/bin/)?\bpython3(?= )|/opt/respawn/respawn\.(?:py|ini)|/app/respawn\.(?:py|ini)",
                  lambda m: paths.get(m.group(0), PY), text)


def run_daemon(test, sup):
    """`run --daemon` on sup's config; the daemon's pid, stopped at cleanup."""
    p = sup.ctl("run", "--daemon")
    test.assertEqual(p.returncode, 0, p.stdout + p.stderr)
    m = re.search(r"started \(pid (\d+)\)", p.stdout)
    test.assertTrue(m, p.stdout)
    pid = int(m.group(1))
    started = proc_stat(pid)[19]

    def stop():
        if proc_stat(pid) and proc_stat(pid)[19] == started:
            sup.ctl("shutdown", timeout=60)
            try:
                wait_for(lambda: not pid_alive(pid), what="the daemon to exit")
            finally:
                kill_group(pid)
    test.addCleanup(stop)
    return pid


def listens_on_any(port):
    """True if something listens on 0.0.0.0:port (from /proc/net/tcp)."""
    with open("/proc/net/tcp") as f:
        for line in f.readlines()[1:]:
            local, state = line.split()[1], line.split()[3]
            if local == "00000000:%04X" % port and state == "0A":
                return True
    return False


def install_debian(command, package):
    """The path of command, installing its Debian package when we can (CI can)."""
    if not shutil.which(command) and shutil.which("apt-get") and os.geteuid() == 0:
        subprocess.run("apt-get install -y -qq %s || (apt-get update -qq && apt-get install -y -qq %s)"
                       % (package, package), shell=True, timeout=900, stdout=subprocess.DEVNULL,
                       stderr=subprocess.DEVNULL, env=dict(os.environ, DEBIAN_FRONTEND="noninteractive"))
    return shutil.which(command)


RULES_TEST = """
rule_files: [respawn-rules.yml]
evaluation_interval: 1m
tests:
  - interval: 1m
    input_series:
      # web on host a: down (FATAL) for good after 2 minutes
      - series: 'respawn_service_up{job="respawn",instance="a:9101",service="web"}'
        values: '1 1 0x20'
      - series: 'respawn_service_ok{job="respawn",instance="a:9101",service="web"}'
        values: '1 1 0x20'
      # batch on host b: stopped by the operator (not up, but ok): no alert
      - series: 'respawn_service_up{job="respawn",instance="b:9101",service="batch"}'
        values: '0x22'
      - series: 'respawn_service_ok{job="respawn",instance="b:9101",service="batch"}'
        values: '1x22'
      # flaky on host b: a restart every 5 minutes
      - series: 'respawn_service_restarts_total{job="respawn",instance="b:9101",service="flaky"}'
        values: '0+0.2x70'
    alert_rule_test:
      - eval_time: 5m
        alertname: RespawnServiceDown
        exp_alerts: []
      - eval_time: 8m
        alertname: RespawnServiceDown
        exp_alerts:
          - exp_labels: {severity: page, job: respawn, instance: "a:9101", service: web}
            exp_annotations:
              summary: "web on a:9101 has not been up for 5 minutes"
      - eval_time: 20m
        alertname: RespawnServiceFlapping
        exp_alerts: []
      - eval_time: 65m
        alertname: RespawnServiceFlapping
        exp_alerts:
          - exp_labels: {severity: ticket, job: respawn, instance: "b:9101", service: flaky}
            exp_annotations:
              summary: "flaky on b:9101 restarted 12 times in an hour"
"""


class TestRecipes(unittest.TestCase):
    """Each recipe of the README, exercised as far as this machine allows."""

    def test_crontab(self):
        sup = Sup(self, OPS_HEADER + "logfile = {dir}/daemon.log\n[program:a]\ncommand = sleep 1000\n"
                  "startsecs = 0\n")
        prom = sup.path("textfile")
        os.mkdir(prom)
        lines = [app_paths(l, sup).replace("/var/lib/node_exporter", prom)
                 for l in readme_recipe("crontab").splitlines() if l.strip()]
        self.assertEqual(len(lines), 3, lines)
        command = lambda l: l.split(None, 1)[1] if l.startswith("@") else l.split(None, 5)[5]
        p = subprocess.run(command(lines[0]), shell=True, stdout=subprocess.PIPE, text=True, timeout=60)
        pid = int(re.search(r"started \(pid (\d+)\)", p.stdout).group(1))
        started = proc_stat(pid)[19]
        self.addCleanup(lambda: proc_stat(pid) and proc_stat(pid)[19] == started and kill_group(pid))
        wait_for(lambda: sup.answers(), what="the daemon")
        self.addCleanup(lambda: [kill_group(s["pid"]) for s in (sup.answers() or {"services": []})["services"]
                                 if s["pid"]])
        p = subprocess.run(command(lines[1]), shell=True, stdout=subprocess.PIPE, text=True, timeout=60)
        self.assertEqual(p.stdout, "already running (pid %d)\n" % pid)
        sup.wait_state("a", "RUNNING")
        subprocess.run(command(lines[2]), shell=True, timeout=60)
        samples, _ = parse_exposition(read_text(os.path.join(prom, "respawn.prom")))
        self.assertEqual(samples[("respawn_service_up", frozenset({("service", "a")}))], 1)
        self.assertEqual(sup.ctl("shutdown").returncode, 0)
        wait_for(lambda: not pid_alive(pid), what="the daemon to exit")
        subprocess.run(command(lines[2]), shell=True, timeout=60, stderr=subprocess.DEVNULL)
        samples, _ = parse_exposition(read_text(os.path.join(prom, "respawn.prom")))
        self.assertEqual(samples, {("respawn_supervisor_up", frozenset()): 0})

    def test_systemd_unit(self):
        import configparser
        unit = configparser.RawConfigParser(strict=False)
        unit.optionxform = str
        unit.read_string(readme_recipe("respawn.service"))
        service = unit["Service"]
        self.assertEqual(service["Type"], "notify")
        self.assertEqual(service["KillMode"], "mixed")
        sup = Sup(self, OPS_HEADER + "[program:a]\ncommand = sleep 1000\nstartsecs = 0.3\n")
        start = app_paths(service["ExecStart"], sup).split()
        self.assertEqual(start, [PY, SCRIPT, "-c", sup.config, "run"])   # what Sup runs
        listener = SystemdListener(self, sup)
        sup.env["WATCHDOG_USEC"] = str(int(float(service["WatchdogSec"]) * 1e6 / 100))   # faster here
        sup.start(wait=False)
        i, ready = listener.wait("READY", "1")
        self.assertEqual(sup.svc("a")["state"], "RUNNING")
        listener.wait("WATCHDOG", "1")
        reload = app_paths(service["ExecReload"], sup).split()
        p = subprocess.run(reload, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=60)
        self.assertEqual(p.returncode, 0, p.stdout)
        i, _ = listener.wait("RELOADING", "1", after=i)
        with open(sup.config, "a") as f:
            f.write("[program:b]\ncommand = sleep 1\nautorestart = sometimes\n")
        p = subprocess.run(reload, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=60)
        self.assertEqual(p.returncode, 1, p.stdout)          # systemctl reload fails, and says why
        self.assertIn("autorestart: expected true, false or unexpected", p.stdout)
        sup.proc.send_signal(signal.SIGTERM)
        listener.wait("STOPPING", "1", after=i)
        self.assertEqual(sup.proc.wait(DEADLINE), 0)

    def test_on_change_to_syslog(self):
        sup = Sup(self, readme_recipe("on_change").replace("[respawn]", OPS_HEADER.rstrip(), 1) +
                  "[program:bad]\ncommand = sh -c 'exit 4'\nstartretries = 1\nbackoff = 0.1\n"
                  "[program:good]\ncommand = sleep 1000\nstartsecs = 0\n")
        bin_dir = sup.path("bin")
        os.mkdir(bin_dir)
        write_text(os.path.join(bin_dir, "logger"), "#!/bin/sh\necho \"$*\" >> %s\n" % sup.path("syslog"))
        os.chmod(os.path.join(bin_dir, "logger"), 0o755)
        sup.env["PATH"] = bin_dir + os.pathsep + os.environ.get("PATH", os.defpath)
        sup.start()
        sup.wait_state("bad", "FATAL")
        wait_for(lambda: "FATAL" in read_or_empty(sup.path("syslog")), what="the FATAL in syslog")
        self.assertEqual(read_or_empty(sup.path("syslog")).splitlines(), [
            "-p user.err respawn: bad BACKOFF: exit 4",
            "-p user.err respawn: bad FATAL: exit 4; gave up after 2 failed starts"])
        self.assertEqual(sup.terminate(), 0)

    def test_ansible_validates_with_check(self):
        text = readme_recipe("ansible.yml")
        validate = re.search(r"validate: (.*)", text).group(1)
        self.assertIn("src: respawn.service", text)
        sup = Sup(self, OPS_HEADER + "[program:a]\ncommand = sleep 1\n")
        good = app_paths(validate, sup).replace("%s", os.path.join(HERE, "respawn.ini"))
        self.assertEqual(subprocess.run(good, shell=True, stdout=subprocess.DEVNULL, timeout=60).returncode, 0)
        bad = sup.path("bad.ini")
        write_text(bad, "[program:a]\ncommand = sleep 1\nautorestart = sometimes\n")
        p = subprocess.run(app_paths(validate, sup).replace("%s", bad), shell=True, timeout=60,
                           stdout=subprocess.PIPE, text=True)
        self.assertEqual(p.returncode, 2, p.stdout)

    def test_docker_image_and_config(self):
        dockerfile = readme_recipe("Dockerfile")
        m = re.search(r"^FROM python:3\.(\d+)-slim$", dockerfile, re.M)
        self.assertTrue(m and 8 <= int(m.group(1)) <= 13, dockerfile)
        entry = json.loads(re.search(r"^ENTRYPOINT (.*)$", dockerfile, re.M).group(1))
        health = json.loads(re.search(r"^HEALTHCHECK CMD (.*)$", dockerfile, re.M).group(1))
        web, metrics = free_port(), free_port()
        ini = readme_recipe("docker.ini").replace("8080", str(web)).replace("9101", str(metrics))
        self.assertIn("--bind 0.0.0.0", ini)
        sup = Sup(self, ini.replace("[respawn]", "[respawn]\nwatch_self = false", 1))
        self.assertEqual(sup.ctl("check").returncode, 0)
        self.assertEqual(app_paths(" ".join(entry), sup).split() + ["run"], [PY, SCRIPT, "-c", sup.config, "run"])
        sup.start()
        sup.wait_state("web", "RUNNING")
        self.assertTrue(listens_on_any(web), "the web server does not listen on 0.0.0.0")
        self.assertTrue(listens_on_any(metrics), "the metrics do not listen on 0.0.0.0")
        self.assertEqual(http_get(metrics)[0], 200)
        p = subprocess.run(app_paths(" ".join(health), sup).split(), timeout=60, stdout=subprocess.PIPE,
                           text=True, env=sup.env)
        self.assertEqual(p.returncode, 0, p.stdout)
        self.assertEqual(sup.terminate(), 0)

    def test_kubernetes_probes(self):
        pod = readme_recipe("pod.yaml")
        commands = [json.loads(c) for c in re.findall(r"command: (\[.*?\])", pod)]
        self.assertEqual(len(commands), 4, commands)
        entry, probes = commands[0], commands[1:]
        sup = Sup(self, OPS_HEADER + "[program:a]\ncommand = sleep 1000\nstartsecs = 0\n")
        self.assertEqual(app_paths(" ".join(entry), sup).split(), [PY, SCRIPT, "-c", sup.config, "run"])
        run = lambda argv: subprocess.run(app_paths(" ".join(argv), sup).split(), timeout=60,
                                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                          env=sup.env).returncode
        self.assertEqual([run(p) for p in probes], [1, 1, 1])          # nothing answers yet
        sup.start()
        sup.wait_state("a", "RUNNING")
        self.assertEqual([run(p) for p in probes], [0, 0, 0])
        write_text(sup.path("x"), "")
        os.kill(sup.svc("a")["pid"], signal.SIGSTOP)      # still RUNNING: liveness is about states
        self.assertEqual(run(probes[2]), 0)
        sup.ctl("signal", "CONT", "a")
        with open(sup.config, "a") as f:
            f.write("[program:gone]\ncommand = /nonexistent/bin\nstartretries = 0\n")
        sup.ctl("reload")
        sup.wait_state("gone", "FATAL")
        self.assertEqual([run(p) for p in probes], [3, 3, 3])
        self.assertEqual(sup.terminate(), 0)

    def test_logrotate_reopens_by_usr1(self):
        tool = install_debian("logrotate", "logrotate")
        if not tool:
            self.skipTest("logrotate (Debian package logrotate) cannot be installed here")
        sup = Sup(self, OPS_HEADER + "pidfile = {dir}/respawn.pid\nlogfile = {dir}/log/respawn.log\n"
                  "[program:talk]\ncommand = sh -c 'i=0; while :; do i=$((i+1)); echo line $i; sleep 0.05; done'\n"
                  "stdout_logfile = {dir}/log/talk.log\nstdout_logfile_maxbytes = 0\n"
                  # prefixed on the daemon's stdout: must move to the new file too
                  "[program:beat]\ncommand = sh -c 'while :; do echo beat; sleep 0.1; done'\n")
        conf = sup.path("logrotate.conf")
        write_text(conf, readme_recipe("logrotate").replace("/var/log/respawn", sup.path("log"))
                   .replace("/run/respawn.pid", sup.path("respawn.pid")))
        p = subprocess.run([tool, "-d", "-s", sup.path("state"), conf], stdout=subprocess.PIPE,
                           stderr=subprocess.STDOUT, text=True, timeout=60)
        self.assertEqual(p.returncode, 0, p.stdout)
        run_daemon(self, sup)
        wait_for(lambda: "line 3\n" in read_or_empty(sup.path("log", "talk.log")), what="talk's lines")
        p = subprocess.run([tool, "-f", "-s", sup.path("state"), conf], stdout=subprocess.PIPE,
                           stderr=subprocess.STDOUT, text=True, timeout=60)
        self.assertEqual(p.returncode, 0, p.stdout)
        rotated = sup.path("log", "talk.log.1")
        self.assertTrue(os.path.exists(rotated))
        # after USR1 new lines go to a new talk.log, the daemon's own lines to a new respawn.log
        wait_for(lambda: "line " in read_or_empty(sup.path("log", "talk.log")), what="a new talk.log")
        wait_for(lambda: "reopening log files" in read_or_empty(sup.path("log", "respawn.log.1")),
                 what="the notice in the old respawn.log")
        self.assertEqual(sup.ctl("restart", "talk").returncode, 0)
        wait_for(lambda: "talk: started pid" in read_or_empty(sup.path("log", "respawn.log")),
                 what="the supervisor's lines in the new respawn.log")
        wait_for(lambda: "beat | beat" in read_or_empty(sup.path("log", "respawn.log")),
                 what="a service's prefixed lines in the new respawn.log")
        before = os.path.getsize(rotated)
        wait_for(lambda: read_or_empty(sup.path("log", "talk.log")).count("\n") > 5, what="more lines")
        self.assertEqual(os.path.getsize(rotated), before, "lines still go to the rotated file")
        self.assertNotIn("talk: started pid", read_or_empty(sup.path("log", "respawn.log.1")).split(
            "reopening log files")[1])

    def test_prometheus_files_with_promtool(self):
        tool = promtool()
        if not tool:
            self.skipTest("promtool (Debian package prometheus) cannot be installed here")
        d = tempfile.mkdtemp(prefix="respawn-prom-")
        self.addCleanup(shutil.rmtree, d, True)
        for name in ("prometheus.yml", "respawn-rules.yml"):
            write_text(os.path.join(d, name), readme_recipe(name))
        write_text(os.path.join(d, "rules_test.yml"), RULES_TEST)
        for args in (["check", "config", "prometheus.yml"], ["check", "rules", "respawn-rules.yml"],
                     ["test", "rules", "rules_test.yml"]):
            p = subprocess.run([tool] + args, cwd=d, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               text=True, timeout=120)
            self.assertEqual(p.returncode, 0, "promtool %s:\n%s" % (" ".join(args), p.stdout))


# -- a fleet: three hosts, each with a supervisor, scraped by a real Prometheus ----

def make_hosts(test, count):
    """[(prefix to run a command on the host, address to scrape)]: network
    namespaces joined to this one by veth pairs where we may create them, else
    loopback (the same port on every host, as on a real fleet, needs namespaces;
    RESPAWN_TEST_NO_NETNS=1 forces loopback)."""
    tag = "%04d" % (os.getpid() % 10000)
    hosts = []
    if os.geteuid() == 0 and shutil.which("ip") and not os.environ.get("RESPAWN_TEST_NO_NETNS"):
        subnet = 100 + os.getpid() % 100
        for i in range(count):
            ns, host_if, ns_if = "rsp-fleet-%s-%d" % (tag, i), "rf%s%dh" % (tag, i), "rf%s%dn" % (tag, i)
            if subprocess.run(["ip", "netns", "add", ns], stderr=subprocess.DEVNULL).returncode != 0:
                break
            test.addCleanup(subprocess.run, ["ip", "netns", "del", ns], stderr=subprocess.DEVNULL)
            test.addCleanup(subprocess.run, ["ip", "link", "del", host_if], stderr=subprocess.DEVNULL)
            net = "10.%d.%d" % (subnet, i)
            steps = [["ip", "link", "add", host_if, "type", "veth", "peer", "name", ns_if],
                     ["ip", "link", "set", ns_if, "netns", ns],
                     ["ip", "addr", "add", net + ".1/24", "dev", host_if],
                     ["ip", "link", "set", host_if, "up"],
                     ["ip", "-n", ns, "addr", "add", net + ".2/24", "dev", ns_if],
                     ["ip", "-n", ns, "link", "set", ns_if, "up"],
                     ["ip", "-n", ns, "link", "set", "lo", "up"]]
            if any(subprocess.run(s, stderr=subprocess.DEVNULL).returncode for s in steps):
                break
            hosts.append((("ip", "netns", "exec", ns), net + ".2", 9101))
        if len(hosts) == count:
            return hosts
    return [((), "127.0.0.1", free_port()) for _ in range(count)]


def prom_api(port, path):
    """A Prometheus API answer (urllib: it speaks chunked HTTP/1.1), or None."""
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))   # never a proxy
    try:
        with opener.open("http://127.0.0.1:%d%s" % (port, path), timeout=DEADLINE) as r:
            return json.loads(r.read().decode())
    except (OSError, ValueError):       # not up yet (URLError is an OSError)
        return None


def prom_query(port, query):
    """The result vector of an instant query: {instance: value}."""
    reply = prom_api(port, "/api/v1/query?query=" + urllib.parse.quote(query))
    if reply is None:
        return {}
    return {r["metric"].get("instance"): float(r["value"][1]) for r in reply["data"]["result"]}


class TestFleet(unittest.TestCase):
    def test_prometheus_scrapes_every_host_and_sees_a_kill(self):
        prometheus = install_debian("prometheus", "prometheus")
        if not prometheus:
            self.skipTest("Prometheus (Debian package prometheus) cannot be installed here")
        hosts = make_hosts(self, 3)
        targets = ["%s:%d" % (address, port) for _, address, port in hosts]
        d = tempfile.mkdtemp(prefix="respawn-prometheus-")
        self.addCleanup(shutil.rmtree, d, True)
        # the README's scrape config and rules, pointed at this fleet, scraped every second
        config = readme_recipe("prometheus.yml").replace("scrape_interval: 15s",
                                                         "scrape_interval: 1s\n  evaluation_interval: 1s")
        config = re.sub(r"targets: \[.*\]", "targets: %s" % json.dumps(targets), config)
        write_text(os.path.join(d, "prometheus.yml"), config)
        write_text(os.path.join(d, "respawn-rules.yml"), readme_recipe("respawn-rules.yml"))
        web = free_port()
        with open(os.path.join(d, "prometheus.log"), "wb") as log:
            proc = subprocess.Popen([prometheus, "--config.file=" + os.path.join(d, "prometheus.yml"),
                                     "--storage.tsdb.path=" + os.path.join(d, "data"),
                                     "--web.listen-address=127.0.0.1:%d" % web],
                                    stdout=log, stderr=log, cwd=d, start_new_session=True)

        def stop_prometheus():
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(DEADLINE)
        self.addCleanup(stop_prometheus)
        # the hosts start while Prometheus does (it scrapes a target that is not up
        # yet again a second later), all three at once
        sups = []
        for i, (prefix, address, port) in enumerate(hosts):
            sup = Sup(self, OPS_HEADER + "metrics = 0.0.0.0:%d\n"
                      "[program:victim]\ncommand = sleep 1000\nstartsecs = 0\nautorestart = false\n"
                      "[program:steady]\ncommand = sleep 1000\nstartsecs = 0\n" % port, name="host%d" % i)
            sups.append(sup.start(prefix=prefix, wait=False))
        for sup in sups:
            wait_for(lambda: sup.answers(), what="the supervisor's socket")
            sup.wait_state("victim", "RUNNING")
        expect_all_up = {t: 1.0 for t in targets}
        slow = DEADLINE * 3             # Prometheus starts, then scrapes each target once a second
        try:
            wait_for(lambda: prom_query(web, 'respawn_service_up{service="victim"}') == expect_all_up,
                     timeout=slow, what="Prometheus to scrape all three hosts", interval=0.5)
            self.assertEqual(prom_query(web, "up"), expect_all_up)
            victim = sups[1].svc("victim")
            os.kill(victim["pid"], signal.SIGKILL)
            sups[1].wait_state("victim", "EXITED")
            seen = dict(expect_all_up, **{targets[1]: 0.0})
            wait_for(lambda: prom_query(web, 'respawn_service_up{service="victim"}') == seen,
                     timeout=slow, what="the kill on host 1 in Prometheus", interval=0.5)
            self.assertEqual(prom_query(web, 'respawn_service_state{service="victim",state="EXITED"}'),
                             {t: (1.0 if t == targets[1] else 0.0) for t in targets})
            self.assertEqual(prom_query(web, 'respawn_service_up{service="steady"}'), expect_all_up)
            rules = prom_api(web, "/api/v1/rules")
            loaded = [r for g in rules["data"]["groups"] for r in g["rules"]]
            self.assertEqual({r["name"] for r in loaded},
                             {"RespawnServiceDown", "RespawnServiceFlapping", "RespawnSupervisorDown"})
            self.assertTrue(all(r["health"] in ("ok", "unknown") for r in loaded), loaded)
        except Exception:
            with open(os.path.join(d, "prometheus.log"), errors="replace") as f:
                sys.stderr.write("prometheus log (end):\n" + f.read()[-3000:])
            raise
        for sup in sups:
            self.assertEqual(sup.terminate(), 0)


if __name__ == "__main__":
    unittest.main()
