"""Tests for respawn.py: stdlib unittest, also runnable by pytest.

    python3 -m unittest -v test_respawn        # or: python3 -m pytest test_respawn.py

Sections follow respawn.py: helpers and config, service policy (fake clock, no
processes), processes and output, the event loop with real supervisors,
control socket and client, re-execution, PID 1.  Tests wait on conditions
under deadlines, never on bare sleeps, and every test kills what it started.
"""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
import unittest

HERE = os.path.dirname(os.path.abspath(__file__))
SCRIPT = os.path.join(HERE, "respawn.py")
PY = sys.executable
sys.path.insert(0, HERE)
import respawn  # noqa: E402

DEADLINE = float(os.environ.get("RESPAWN_TEST_DEADLINE", "20"))


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
        self.seen_pids = set()
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
        return subprocess.run([PY, self.script, "-c", self.config] + list(args),
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
            if s["pid"]:
                self.seen_pids.add(s["pid"])
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

    def terminate(self, sig=signal.SIGTERM, timeout=DEADLINE):
        """Signal the supervisor and wait for its exit code."""
        self.proc.send_signal(sig)
        return self.proc.wait(timeout)

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
        for pid in self.seen_pids:
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
    p = subprocess.run([PY, SCRIPT, "-c", path, "check"] + list(extra), stdout=subprocess.PIPE,
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


if __name__ == "__main__":
    unittest.main()
