#!/usr/bin/env python3
"""bench.py: respawn.py measured against supervisord, Circus, runit and s6.

    python3 bench/bench.py              # full run (about 10 minutes)
    python3 bench/bench.py --quick      # under three minutes
    python3 bench/bench.py --json out.json

Standard library only.  The peers are installed into a scratch folder of the
bench's own (supervisord and Circus from PyPI into a throwaway virtualenv;
runit and s6 from Debian's packages with apt-get where apt is available); a
peer that cannot be installed is reported as missing.  Every process the
bench starts is recorded (PID and kernel start time) and killed at the end,
also on Ctrl-C.  bench/README.md explains each number and how it is taken.
"""

import argparse
import fcntl
import json
import os
import platform
import random
import re
import resource
import select
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
RESPAWN = os.path.join(os.path.dirname(HERE), "respawn.py")
CLK_TCK = os.sysconf("SC_CLK_TCK")
PEERS = ("respawn", "supervisord", "circus", "runit", "s6")
SLEEP = "/bin/sleep"
CAT = "/bin/cat"


def log(msg):
    sys.stderr.write("[bench %s] %s\n" % (time.strftime("%H:%M:%S"), msg))
    sys.stderr.flush()


# ---------------------------------------------------------------------------
# /proc: process identity, trees, CPU, wakeups, memory
# ---------------------------------------------------------------------------

def proc_stat(pid):
    """(ppid, starttime, comm, utime+stime ticks) of a live process, or None."""
    try:
        with open("/proc/%d/stat" % pid, "rb") as f:
            data = f.read().decode("utf-8", "replace")
    except OSError:
        return None
    comm = data[data.index("(") + 1:data.rindex(")")]
    fields = data[data.rindex(")") + 2:].split()
    # fields[0] is state (field 3); ppid is field 4, utime 14, stime 15, starttime 22
    return int(fields[1]), int(fields[19]), comm, int(fields[11]) + int(fields[12])


def proc_table():
    table = {}
    for name in os.listdir("/proc"):
        if name.isdigit():
            st = proc_stat(int(name))
            if st:
                table[int(name)] = st
    return table


def descendants(root, table=None):
    """{pid: starttime} of root and everything below it."""
    table = table if table is not None else proc_table()
    children = {}
    for pid, st in table.items():
        children.setdefault(st[0], []).append(pid)
    out, todo = {}, [root]
    while todo:
        pid = todo.pop()
        if pid in table and pid not in out:
            out[pid] = table[pid][1]
            todo.extend(children.get(pid, ()))
    return out


def status_field(pid, key):
    try:
        with open("/proc/%s/status" % pid) as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def pss_kib(pid, key="Pss"):
    """A field of /proc/PID/smaps_rollup in KiB (Pss, Pss_Anon...), or None."""
    try:
        with open("/proc/%d/smaps_rollup" % pid) as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def schedstat_ns(path):
    """CPU time in ns of a task (/proc/.../schedstat: the scheduler's own
    count, finer than the 10 ms ticks of /proc/PID/stat), or None."""
    try:
        with open("/proc/%s/schedstat" % path) as f:
            return int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def usage(pids):
    """Summed CPU seconds (all threads) and context switches (summed over every
    thread: Circus runs ZeroMQ I/O threads) of some processes now."""
    cpu = vol = invol = 0
    for pid in pids:
        st = proc_stat(pid)
        if st is None:
            continue
        try:
            tids = os.listdir("/proc/%d/task" % pid)
        except OSError:
            tids = []
        ns = [schedstat_ns("%d/task/%s" % (pid, tid)) for tid in tids]
        if tids and None not in ns:
            cpu += sum(ns) / 1e9
        else:
            cpu += st[3] / CLK_TCK
        for tid in tids:
            path = "%d/task/%s" % (pid, tid)
            vol += status_field(path, "voluntary_ctxt_switches") or 0
            invol += status_field(path, "nonvoluntary_ctxt_switches") or 0
    return {"cpu": cpu, "vol": vol, "invol": invol}


def memory(pids):
    pss = sum(pss_kib(p) or 0 for p in pids)
    rss = sum(status_field(p, "VmRSS") or 0 for p in pids)
    return {"pss_mib": pss / 1024.0, "rss_mib": rss / 1024.0, "processes": len(pids)}


# ---------------------------------------------------------------------------
# Everything we start, so that everything is killed at the end
# ---------------------------------------------------------------------------

class Reaper:
    """Records (pid, kernel start time) of every process the bench may have
    caused; kill_all() kills exactly those still alive, never by name."""

    def __init__(self):
        self.known = {}
        self.lock = threading.Lock()

    def note(self, pid, starttime=None):
        if starttime is None:
            st = proc_stat(pid)
            if st is None:
                return
            starttime = st[1]
        with self.lock:
            self.known[pid] = starttime

    def note_tree(self, root):
        for pid, start in descendants(root).items():
            self.note(pid, start)

    def kill_known(self, pids=None):
        with self.lock:
            items = list(self.known.items()) if pids is None else \
                [(p, self.known[p]) for p in pids if p in self.known]
        gone = []
        for pid, start in items:
            st = proc_stat(pid)
            if st is not None and st[1] == start:
                try:
                    os.kill(pid, signal.SIGKILL)
                except OSError:
                    pass
            else:
                gone.append(pid)            # exited earlier: forget it (churn makes thousands)
        with self.lock:
            for pid in gone:
                if self.known.get(pid) == dict(items).get(pid):
                    del self.known[pid]
        for pid, _ in items:            # reap those that are our own children
            try:
                os.waitpid(pid, os.WNOHANG)
            except ChildProcessError:
                pass

    def alive(self, wait=0.0):
        """Recorded processes still running (zombies aside), after up to `wait` s."""
        deadline = time.monotonic() + wait
        while True:
            with self.lock:
                items = list(self.known.items())
            left = [p for p, s in items if (proc_stat(p) or (0, None))[1] == s
                    and not is_zombie(p)]
            if not left or time.monotonic() >= deadline:
                return left
            time.sleep(0.05)


def is_zombie(pid):
    try:
        with open("/proc/%d/stat" % pid, "rb") as f:
            data = f.read()
    except OSError:
        return True
    return data[data.rindex(b")") + 2:][:1] in (b"Z", b"X")


REAPER = Reaper()


# ---------------------------------------------------------------------------
# The FIFO every service instance announces itself on: "NAME PID\n"
# ---------------------------------------------------------------------------

class Announcements:
    """A reader thread timestamps (CLOCK_MONOTONIC) each line as it arrives."""

    def __init__(self, path):
        self.path = path
        os.mkfifo(path, 0o600)
        self.fd = os.open(path, os.O_RDWR)          # a writer never blocks in open()
        self.events = []                            # (t, name, pid)
        self.cond = threading.Condition()
        self.stopping = False
        self.thread = threading.Thread(target=self.reader, daemon=True)
        self.thread.start()

    def reader(self):
        buf = b""
        while True:
            data = os.read(self.fd, 65536)
            t = time.monotonic()
            if self.stopping:
                return
            buf += data
            lines = buf.split(b"\n")
            buf = lines.pop()
            new = []
            for line in lines:
                parts = line.split()
                if len(parts) == 2 and parts[1].isdigit():
                    new.append((t, parts[0].decode(), int(parts[1])))
            for _, _, pid in new:
                REAPER.note(pid)
            with self.cond:
                self.events.extend(new)
                self.cond.notify_all()

    def mark(self):
        with self.cond:
            return len(self.events)

    def since(self, mark):
        with self.cond:
            return self.events[mark:]

    def wait(self, predicate, timeout):
        """Wait until predicate(events) is true; returns it (falsy on timeout)."""
        deadline = time.monotonic() + timeout
        with self.cond:
            while True:
                result = predicate(self.events)
                if result or time.monotonic() > deadline:
                    return result
                self.cond.wait(min(0.5, max(0.0, deadline - time.monotonic())))

    def close(self):
        self.stopping = True
        try:
            os.write(self.fd, b"\n")
        except OSError:
            pass
        self.thread.join(2)
        os.close(self.fd)


class ExecEvents:
    """The kernel's process events connector (netlink, needs root): the exact
    CLOCK_MONOTONIC time at which each process called execve().  Used to time
    the new instance's start without the service's own start-up in the number.
    Absent (None) where the connector is not permitted; then only the service's
    own announcement is used."""

    def __init__(self):
        import socket
        import struct
        self.struct = struct
        self.sock = socket.socket(socket.AF_NETLINK, socket.SOCK_DGRAM, 11)  # NETLINK_CONNECTOR
        try:
            self.sock.setsockopt(socket.SOL_SOCKET, 33, 8 << 20)             # SO_RCVBUFFORCE
        except OSError:
            pass
        self.sock.bind((0, 1))                                                # CN_IDX_PROC
        op = struct.pack("I", 1)                                              # PROC_CN_MCAST_LISTEN
        cn = struct.pack("IIIIHH", 1, 1, 0, 0, len(op), 0) + op
        self.sock.send(struct.pack("IHHII", 16 + len(cn), 3, 0, 0, 0) + cn)   # NLMSG_DONE
        self.execs = {}               # pid -> [monotonic seconds of each exec]
        self.lock = threading.Lock()
        self.stopping = False
        self.thread = threading.Thread(target=self.reader, daemon=True)
        self.thread.start()

    def reader(self):
        unpack = self.struct.unpack_from
        while not self.stopping:
            try:
                data = self.sock.recv(65536)
            except OSError:          # ENOBUFS when the system is very busy: lose some
                if self.stopping:
                    return
                continue
            off = 0
            while off + 16 <= len(data):
                length = unpack("I", data, off)[0]
                if length < 16:
                    break
                what, _, ts = unpack("IIQ", data, off + 36)
                if what == 2:        # PROC_EVENT_EXEC
                    pid = unpack("I", data, off + 56)[0]
                    with self.lock:
                        self.execs.setdefault(pid, []).append(ts / 1e9)
                off += (length + 3) & ~3

    def first_exec_after(self, pid, t):
        with self.lock:
            times = [x for x in self.execs.get(pid, ()) if x >= t]
        return min(times) if times else None

    def forget(self):
        with self.lock:
            self.execs.clear()

    def close(self):
        self.stopping = True
        self.sock.close()


def exec_events():
    try:
        return ExecEvents()
    except OSError as exc:
        log("kernel exec events unavailable (%s): latency is timed by the services' own "
            "announcements only" % exc)
        return None


# ---------------------------------------------------------------------------
# Services: one small sh script per service, the same file for every peer
# ---------------------------------------------------------------------------

def write_script(path, name, fifo, kind, data=None):
    """long: announce, then sleep; churn: announce and exit at once;
    output: announce, copy the data file to stdout, then sleep (never restarted)."""
    body = ["#!/bin/sh", 'echo "%s $$" >%s' % (name, fifo)]
    if kind == "long":
        body.append("exec %s 100000000" % SLEEP)
    elif kind == "output":
        body += ["%s %s" % (CAT, data), "exec %s 100000000" % SLEEP]
    with open(path, "w") as f:
        f.write("\n".join(body) + "\n")
    os.chmod(path, 0o755)


class Services:
    prefixed = False          # respawn.py: its default output (pipes, prefixed) instead of none

    def __init__(self, work, fifo, kind, n, data=None, prefix=None):
        self.kind = kind
        self.names = ["%s%03d" % (prefix or kind[0], i) for i in range(n)] if kind != "output" \
            else ["out"]
        self.scripts = {}
        folder = os.path.join(work, "scripts")
        os.makedirs(folder, exist_ok=True)
        for name in self.names:
            path = os.path.join(folder, name)
            write_script(path, name, fifo, kind, data)
            self.scripts[name] = path


# ---------------------------------------------------------------------------
# Peers: how to install, configure, start and stop each
# ---------------------------------------------------------------------------

class Peer:
    name = None
    own_comm = None          # comm of the supervisor's own child processes (runsv...)
    missing = None           # why it cannot run, or None
    version = None

    def __init__(self, env):
        self.env = env

    def command(self, work, services, output_log):
        raise NotImplementedError

    def graceful(self, proc):
        proc.send_signal(signal.SIGTERM)

    logger_comm = None       # the log writer of runit/s6, part of the output path

    def own_pids(self, top, logger=False):
        if not self.own_comm:
            return [top] if proc_stat(top) else []
        table = proc_table()
        pids = [top] + [p for p, st in table.items() if st[0] == top and st[2] == self.own_comm]
        if logger and self.logger_comm:
            pids += [p for p in descendants(top, table) if table[p][2] == self.logger_comm]
        return pids

    def output_log(self, work):
        return os.path.join(work, "out.log")


class RespawnPeer(Peer):
    name = "respawn"

    def __init__(self, env):
        super().__init__(env)
        self.python = env["python"]
        if not os.path.exists(RESPAWN):
            self.missing = "respawn.py not found at %s" % RESPAWN
            return
        out = subprocess.run([self.python, RESPAWN, "--version"], capture_output=True, text=True)
        self.version = out.stdout.strip().split()[-1] if out.returncode == 0 else "?"
        # since issue 10 an unplanned restart within backoff_reset of the previous
        # one backs off; 0 restores the immediate restart (1.0.0 has no such key)
        with open(RESPAWN, "rb") as f:
            self.backoff_reset = b'"backoff_reset"' in f.read()

    def config(self, work, services, output_log):
        lines = ["[respawn]", "socket = %s/r.sock" % work, "loglevel = info", ""]
        for name in services.names:
            lines += ["[program:%s]" % name, "command = %s" % services.scripts[name],
                      "startsecs = 0", "stopwaitsecs = 2"]
            if self.backoff_reset:
                lines.append("backoff_reset = 0")
            if services.kind == "output" and services.prefixed:
                lines += ["stderr_logfile = none"]
            elif services.kind == "output":
                lines += ["stdout_logfile = %s" % output_log, "stdout_logfile_maxbytes = 0",
                          "stderr_logfile = none"]
            elif not services.prefixed:
                lines += ["stdout_logfile = none", "stderr_logfile = none"]
            lines.append("")
        path = os.path.join(work, "respawn.ini")
        with open(path, "w") as f:
            f.write("\n".join(lines))
        return path

    def command(self, work, services, output_log):
        return [self.python, RESPAWN, "-c", self.config(work, services, output_log), "run"]

    def client(self, work, *args, timeout=60):
        t0 = time.monotonic()
        out = subprocess.run([self.python, RESPAWN, "-c", os.path.join(work, "respawn.ini")]
                             + list(args), capture_output=True, text=True, timeout=timeout)
        return out, time.monotonic() - t0


class VenvPeer(Peer):
    """A Python peer installed into the throwaway virtualenv."""
    tool = None              # its executable's key in env

    def __init__(self, env):
        super().__init__(env)
        self.exe = env.get(self.tool)
        if not self.exe:
            self.missing = env.get("venv_error") or "not installed"
            return
        out = subprocess.run([self.exe, "--version"], capture_output=True, text=True)
        self.version = (out.stdout or out.stderr).strip().split()[-1]


class SupervisordPeer(VenvPeer):
    name = tool = "supervisord"

    def command(self, work, services, output_log):
        lines = ["[supervisord]", "nodaemon = true", "user = root" if os.geteuid() == 0 else "",
                 "logfile = %s/supervisord.log" % work, "pidfile = %s/supervisord.pid" % work,
                 "childlogdir = %s" % work, "loglevel = info", ""]
        for name in services.names:
            lines += ["[program:%s]" % name, "command = %s" % services.scripts[name],
                      "startsecs = 0", "autorestart = true", "startretries = 1000000",
                      "stopwaitsecs = 2", "stopasgroup = true", "killasgroup = true"]
            if services.kind == "output":
                lines += ["stdout_logfile = %s" % output_log, "stdout_logfile_maxbytes = 0",
                          "stdout_logfile_backups = 0", "stderr_logfile = NONE"]
            else:
                lines += ["stdout_logfile = NONE", "stderr_logfile = NONE"]
            lines.append("")
        path = os.path.join(work, "supervisord.conf")
        with open(path, "w") as f:
            f.write("\n".join(lines))
        return [self.exe, "-n", "-c", path]


class CircusPeer(VenvPeer):
    name, tool = "circus", "circusd"

    def command(self, work, services, output_log):
        lines = ["[circus]", "endpoint = ipc://%s/circus-ctl.sock" % work,
                 "pubsub_endpoint = ipc://%s/circus-pub.sock" % work,
                 "stats_endpoint = ipc://%s/circus-stats.sock" % work,
                 "statsd = false", "loglevel = INFO",
                 # config.py defaults to 5 s, the Arbiter class to 1 s: the figures
                 # were taken at 1 s.  Lower restarts faster but wakes it more at idle.
                 "check_delay = 1", ""]
        for name in services.names:
            lines += ["[watcher:%s]" % name, "cmd = %s" % services.scripts[name],
                      "numprocesses = 1", "respawn = true", "warmup_delay = 0",
                      "max_retry = -1", "graceful_timeout = 2", "copy_env = true"]
            if services.kind == "output":
                lines += ["stdout_stream.class = FileStream",
                          "stdout_stream.filename = %s" % output_log,
                          "stdout_stream.max_bytes = 0"]
            lines.append("")
        path = os.path.join(work, "circus.ini")
        with open(path, "w") as f:
            f.write("\n".join(lines))
        return [self.exe, path]


class RunitPeer(Peer):
    name = "runit"
    own_comm = "runsv"
    logger_comm = "svlogd"

    def __init__(self, env):
        super().__init__(env)
        self.exe = shutil.which("runsvdir")
        if not self.exe or not shutil.which("runsv"):
            self.missing = env.get("apt_error") or "runsvdir/runsv not installed"
            return
        self.version = debian_version("runit")

    def command(self, work, services, output_log):
        scan = os.path.join(work, "runit")
        for name in services.names:
            d = os.path.join(scan, name)
            os.makedirs(d)
            shutil.copy(services.scripts[name], os.path.join(d, "run"))
            if services.kind == "output":
                logdir = os.path.dirname(output_log)
                os.makedirs(os.path.join(d, "log"))
                os.makedirs(logdir, exist_ok=True)
                with open(os.path.join(logdir, "config"), "w") as f:
                    f.write("s0\n")         # never rotate: one file to compare
                script = os.path.join(d, "log", "run")
                with open(script, "w") as f:
                    f.write("#!/bin/sh\nexec svlogd %s\n" % logdir)
                os.chmod(script, 0o755)
        return [self.exe, scan]

    def output_log(self, work):
        return os.path.join(work, "runit-log", "current")

    def graceful(self, proc):
        proc.send_signal(signal.SIGHUP)      # runsvdir: TERM every runsv, then exit


class S6Peer(Peer):
    name = "s6"
    own_comm = "s6-supervise"
    logger_comm = "s6-log"

    def __init__(self, env):
        super().__init__(env)
        self.exe = shutil.which("s6-svscan")
        if not self.exe or not os.path.exists("/usr/bin/s6-supervise"):
            self.missing = env.get("apt_error") or "s6-svscan/s6-supervise not installed"
            return
        self.version = debian_version("s6")

    def command(self, work, services, output_log):
        scan = os.path.join(work, "s6")
        for name in services.names:
            d = os.path.join(scan, name)
            os.makedirs(d)
            # s6-supervise restarts a dead service only a second after its death,
            # unless the service said it was ready (notification-fd) over a second
            # before: its fastest legitimate restart needs that readiness line.
            with open(services.scripts[name]) as f:
                lines = f.read().split("\n")
            lines.insert(2, "echo >&3")
            with open(os.path.join(d, "run"), "w") as f:
                f.write("\n".join(lines))
            os.chmod(os.path.join(d, "run"), 0o755)
            with open(os.path.join(d, "notification-fd"), "w") as f:
                f.write("3\n")
            if services.kind == "output":
                logdir = os.path.dirname(output_log)
                os.makedirs(os.path.join(d, "log"))
                script = os.path.join(d, "log", "run")
                with open(script, "w") as f:
                    # s6-log's largest file size, so that nothing is rotated
                    f.write("#!/bin/sh\nexec s6-log n2 s268435455 %s\n" % logdir)
                os.chmod(script, 0o755)
        return [self.exe, "-c", str(2 * len(services.names) + 10), scan]

    def output_log(self, work):
        return os.path.join(work, "s6-log", "current")


PEER_CLASSES = {"respawn": RespawnPeer, "supervisord": SupervisordPeer, "circus": CircusPeer,
                "runit": RunitPeer, "s6": S6Peer}


def debian_version(package):
    try:
        out = subprocess.run(["dpkg-query", "-W", "-f=${Version}", package],
                             capture_output=True, text=True)
        return out.stdout.strip() or "?"
    except OSError:
        return "?"


# ---------------------------------------------------------------------------
# Installation of the peers
# ---------------------------------------------------------------------------

def install_peers(scratch, wanted, venv=None):
    env = {"python": sys.executable}
    if {"supervisord", "circus"} & set(wanted) or venv:
        if venv is None:
            venv = os.path.join(scratch, "venv")
            log("installing supervisor and circus from PyPI into %s" % venv)
            try:
                subprocess.run([sys.executable, "-m", "venv", venv], check=True,
                               capture_output=True, timeout=300)
                r = subprocess.run([os.path.join(venv, "bin", "pip"), "install", "-q",
                                    "supervisor", "circus"], capture_output=True, text=True,
                                   timeout=900)
                if r.returncode != 0:
                    env["venv_error"] = "pip install failed: %s" % (
                        r.stderr.strip().splitlines() or ["?"])[-1]
            except (OSError, subprocess.SubprocessError) as exc:
                env["venv_error"] = "virtualenv failed: %s" % exc
        for exe in ("supervisord", "circusd"):
            path = os.path.join(venv, "bin", exe)
            if os.path.exists(path):
                env[exe] = path
        vpy = os.path.join(venv, "bin", "python")
        if os.path.exists(vpy):
            env["python"] = vpy
    need = [p for p, exe in (("runit", "runsvdir"), ("s6", "s6-svscan")) if p in wanted
            and not shutil.which(exe)]
    if need:
        if not shutil.which("apt-get"):
            env["apt_error"] = "apt-get not available"
        elif os.geteuid() != 0:
            env["apt_error"] = "not root: apt-get install %s by hand" % " ".join(need)
        else:
            log("installing %s from Debian's packages (apt-get)" % " ".join(need))
            try:
                r = subprocess.run(["apt-get", "install", "-y", "-q", "--no-install-recommends"]
                                   + need, capture_output=True, text=True, timeout=600,
                                   env=dict(os.environ, DEBIAN_FRONTEND="noninteractive"))
                if r.returncode != 0:
                    subprocess.run(["apt-get", "update", "-q"], capture_output=True, timeout=600)
                    r = subprocess.run(["apt-get", "install", "-y", "-q",
                                        "--no-install-recommends"] + need,
                                       capture_output=True, text=True, timeout=600,
                                       env=dict(os.environ, DEBIAN_FRONTEND="noninteractive"))
                if r.returncode != 0:
                    env["apt_error"] = "apt-get install failed: %s" % (
                        r.stderr.strip().splitlines() or ["?"])[-1]
            except (OSError, subprocess.SubprocessError) as exc:
                env["apt_error"] = "apt-get failed: %s" % exc
    return env


# ---------------------------------------------------------------------------
# One supervisor run
# ---------------------------------------------------------------------------

class Run:
    """A peer supervising a set of services in a fresh work folder."""

    def __init__(self, bench, peer, kind, n, label):
        self.bench, self.peer = bench, peer
        self.work = tempfile.mkdtemp(prefix="%s-%s-" % (peer.name, label), dir=bench.scratch)
        self.services = Services(self.work, bench.fifo.path, kind, n, bench.data_path)
        self.output_log = peer.output_log(self.work)
        self.proc = None
        self.preexec = None
        self.stdout_path = None       # the supervisor's stdout apart from its stderr

    def start(self):
        cmd = self.peer.command(self.work, self.services, self.output_log)
        self.mark = self.bench.fifo.mark()
        out = open(os.path.join(self.work, "supervisor.out"), "wb")
        stdout = open(self.stdout_path, "wb") if self.stdout_path else out
        self.t0 = time.monotonic()
        self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=stdout, stderr=out,
                                     cwd=self.work, start_new_session=True,
                                     preexec_fn=self.preexec)
        out.close()
        stdout.close()
        REAPER.note(self.proc.pid)
        return self

    def all_running(self, timeout):
        """Seconds from launch until every service announced itself, or None."""
        want = set(self.services.names)
        mark = self.mark

        def done(events):
            seen = {}
            for t, name, pid in events[mark:]:
                if name in want and name not in seen:
                    seen[name] = t
            return max(seen.values()) if len(seen) == len(want) else None
        last = self.bench.fifo.wait(done, timeout)
        if last is None:
            return None
        return last - self.t0

    def latest(self):
        """{name: (t, pid)} of the newest instance of every service."""
        out = {}
        for t, name, pid in self.bench.fifo.since(self.mark):
            out[name] = (t, pid)
        return out

    def own(self):
        return self.peer.own_pids(self.proc.pid)

    def tail_out(self, n=5):
        try:
            with open(os.path.join(self.work, "supervisor.out"), "rb") as f:
                return b"\n".join(f.read().splitlines()[-n:]).decode("utf-8", "replace")
        except OSError:
            return ""

    def stop(self):
        if self.proc is None:
            return
        REAPER.note_tree(self.proc.pid)
        tree = list(descendants(self.proc.pid))
        if self.proc.poll() is None:
            try:
                self.peer.graceful(self.proc)
                self.proc.wait(timeout=10)
            except (subprocess.TimeoutExpired, OSError):
                pass
        REAPER.kill_known(tree)
        REAPER.kill_known()
        try:
            self.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            pass
        self.proc = None


# ---------------------------------------------------------------------------
# The measurements
# ---------------------------------------------------------------------------

def pct(values, p):
    if not values:
        return None
    values = sorted(values)
    k = (len(values) - 1) * p / 100.0
    lo, hi = int(k), min(int(k) + 1, len(values) - 1)
    return values[lo] + (values[hi] - values[lo]) * (k - lo)


class Bench:
    def __init__(self, args, scratch, env):
        self.args, self.scratch, self.env = args, scratch, env
        self.fifo = Announcements(os.path.join(scratch, "announce.fifo"))
        self.execs = exec_events()
        self.data_path = None
        self.results = {}

    # (0) what the service start itself costs, for reading the latencies
    def baseline(self):
        folder = tempfile.mkdtemp(prefix="baseline-", dir=self.scratch)
        path = os.path.join(folder, "b")
        write_script(path, "base", self.fifo.path, "churn")
        lat = []
        for _ in range(30):
            mark = self.fifo.mark()
            t0 = time.monotonic()
            pid = os.posix_spawn(path, [path], os.environ)
            ev = self.fifo.wait(lambda e: e[mark:] and e[mark][0], 5)
            os.waitpid(pid, 0)
            if ev:
                lat.append((ev - t0) * 1000)
        res = {"spawn_to_announce_ms_p50": pct(lat, 50), "spawn_to_announce_ms_p99": pct(lat, 99)}
        for n in (100, 500):
            res["floor%d_s" % n] = self.floor(n)
        res.update(self.spawn_vs_fds())
        res.update(self.latency_floor())
        res.update(self.memory_floor())
        if "output" in self.args.only:
            res.update(self.output_floor())
        return res

    def latency_floor(self, kills=30):
        """The least a supervisor can take from a kill to the new instance's exec
        on this machine: a small process of its own (no threads, few fds) kills
        the script's instance, waits on its pidfd, reaps it and posix_spawns the
        script again; the exec is timed by the kernel's events as for the peers."""
        if not self.execs or not hasattr(os, "pidfd_open"):
            return {}
        folder = tempfile.mkdtemp(prefix="latfloor-", dir=self.scratch)
        path = os.path.join(folder, "f")
        with open(path, "w") as f:
            f.write("#!/bin/sh\nexec %s 100000000\n" % SLEEP)
        os.chmod(path, 0o755)
        code = ("import os, select, sys, time\n"
                "path = sys.argv[1]\n"
                "pid = os.posix_spawn(path, [path], os.environ, setsid=True)\n"
                "for _ in range(int(sys.argv[2])):\n"
                "    time.sleep(0.03)\n"
                "    fd = os.pidfd_open(pid)\n"
                "    t0 = time.monotonic()\n"
                "    os.kill(pid, 9)\n"
                "    select.select([fd], [], [])\n"
                "    os.waitpid(pid, 0)\n"
                "    os.close(fd)\n"
                "    pid = os.posix_spawn(path, [path], os.environ, setsid=True)\n"
                "    print(t0, pid, flush=True)\n"
                "time.sleep(0.2)\n"
                "os.kill(pid, 9)\n")
        out = subprocess.run([sys.executable, "-I", "-c", code, path, str(kills)],
                             capture_output=True, text=True, timeout=120)
        lat = []
        for line in out.stdout.split("\n"):
            if line.strip():
                t0, pid = line.split()
                te = self.execs.first_exec_after(int(pid), float(t0))
                if te is not None:
                    lat.append((te - float(t0)) * 1000)
        if len(lat) < kills * 0.9:
            return {}
        return {"exec_floor_p50_ms": pct(lat, 50), "exec_floor_p99_ms": pct(lat, 99)}

    # What a resting respawn.py supervisor holds beyond its own data: its top-level
    # imports, subprocess (spawns), ctypes (the file watch's inotify), resource
    # (RLIMIT_NOFILE), grp and pwd (each program's user checked), zlib (its kept
    # source, packed) and hashlib's built-in sha256 (without libcrypto, as
    # respawn.py imports it).  Checked against the extension modules a supervisor
    # of 10 services maps (/proc/PID/maps): the same.
    FLOOR_IMPORTS = ("import errno, fcntl, gc, heapq, itertools, json, os, re, selectors, signal\n"
                     "import socket, stat, struct, sys, time\n"
                     "import subprocess, ctypes, resource, grp, pwd, zlib\n"
                     "sys.modules['_hashlib'] = None\n"
                     "from hashlib import sha256\n"
                     "del sys.modules['_hashlib']\n")

    def memory_floor(self):
        """The least memory a supervisor can take under the interpreter respawn.py
        runs with, started as its loader re-executes it (-I -S): a bare interpreter
        sleeping, and one that imported what a resting supervisor holds.  PSS and
        Pss_Anon 1 s after the process wrote that it is ready."""
        res = {}
        for label, code in (("bare", "import time\n"), ("imports", self.FLOOR_IMPORTS)):
            code += "print('ready', flush=True)\ntime.sleep(60)\n"
            proc = subprocess.Popen([self.env["python"], "-I", "-S", "-c", code],
                                    stdin=subprocess.DEVNULL, stdout=subprocess.PIPE)
            REAPER.note(proc.pid)
            try:
                ready, _, _ = select.select([proc.stdout], [], [], 30)
                if not ready or proc.stdout.readline().strip() != b"ready":
                    continue
                time.sleep(1.0)
                pss, anon = pss_kib(proc.pid), pss_kib(proc.pid, "Pss_Anon")
                if pss is not None and proc.poll() is None:
                    key = "memory_floor_%s_" % label
                    res[key + "pss_mib"] = pss / 1024.0
                    res[key + "anon_mib"] = None if anon is None else anon / 1024.0
            finally:
                REAPER.kill_known([proc.pid])
                proc.wait(timeout=5)
                proc.stdout.close()
        return res

    def spawn_vs_fds(self, spawns=100):
        """What one spawn costs the parent (vfork until the child's exec) with few
        fds open and with 15 000 (5000 services' pidfds and pipes): the kernel
        copies the whole fd table into the child and closes it again at exec."""
        folder = tempfile.mkdtemp(prefix="fdcost-", dir=self.scratch)
        path = os.path.join(folder, "t")
        with open(path, "w") as f:
            f.write("#!/bin/sh\nexit 0\n")
        os.chmod(path, 0o755)
        out, held = {}, []
        try:
            for label, nfds in (("few", 0), ("15000", 15000)):
                while len(held) < nfds:
                    held.extend(os.pipe())
                pids, t0 = [], time.monotonic()
                for _ in range(spawns):
                    pids.append(os.posix_spawn(path, [path], os.environ))
                out["spawn_ms_fds_%s" % label] = (time.monotonic() - t0) * 1000 / spawns
                for pid in pids:
                    os.waitpid(pid, 0)
        except OSError as exc:
            out["spawn_vs_fds_error"] = str(exc)
        finally:
            for fd in held:
                os.close(fd)
        return out

    # (1) respawn latency
    def latency(self, peer):
        kills = self.args.kills
        run = Run(self, peer, "long", 30, "latency").start()
        try:
            if run.all_running(60) is None:
                return {"error": "services did not all start within 60 s"}
            lat, lat_exec = [], []
            pending = {}
            if self.execs:
                self.execs.forget()
            # runit and s6 wait a second after a death within a second of the
            # start: every kill hits an instance that has been up at least 1.2 s
            deadline = time.monotonic() + 60 + kills * 3
            while len(lat) < kills and time.monotonic() < deadline:
                now = time.monotonic()
                latest = run.latest()
                for name, (t0, pid) in list(pending.items()):
                    t, newpid = latest.get(name, (0, pid))
                    if newpid != pid and t >= t0:
                        lat.append((t - t0) * 1000)
                        if self.execs:
                            te = self.execs.first_exec_after(newpid, t0)
                            if te is not None and te <= t:
                                lat_exec.append((te - t0) * 1000)
                        del pending[name]
                ready = [(t, name, pid) for name, (t, pid) in latest.items()
                         if name not in pending and now - t >= 1.2]
                if ready and len(lat) + len(pending) < kills:
                    t, name, pid = min(ready)
                    t_kill = time.monotonic()
                    try:
                        os.kill(pid, signal.SIGKILL)
                    except ProcessLookupError:
                        continue
                    pending[name] = (t_kill, pid)
                    # wait for this respawn (fast peers) or at most ~100 ms (slow
                    # ones: kills then overlap, each still timed on its own)
                    mark = self.fifo.mark()
                    self.fifo.wait(lambda e: any(n == name for _, n, _ in e[mark:]), 0.1)
                    time.sleep(random.uniform(0.01, 0.05))   # no phase lock with a poll loop
                else:
                    time.sleep(0.01)
            if len(lat) < kills:
                return {"error": "only %d of %d kills were followed by a respawn" % (len(lat), kills)}
            res = {"kills": len(lat), "announce_p50_ms": pct(lat, 50),
                   "announce_p99_ms": pct(lat, 99), "announce_max_ms": max(lat)}
            if len(lat_exec) >= 0.9 * len(lat):
                res.update({"exec_p50_ms": pct(lat_exec, 50), "exec_p99_ms": pct(lat_exec, 99),
                            "exec_max_ms": max(lat_exec), "exec_timed": len(lat_exec)})
            return res
        finally:
            run.stop()

    # (2) idle cost, (3) memory, (4a) start time for 100, (7a) re-exec with 100
    def hundred(self, peer):
        res = {}
        run = Run(self, peer, "long", 100, "idle").start()
        try:
            t = run.all_running(120)
            if t is None:
                return {"error": "100 services did not all start within 120 s"}
            res["start100_s"] = t
            time.sleep(2.0)                 # past every start-up timer (startsecs...)
            pids = run.own()
            before = usage(pids)
            time.sleep(self.args.idle)
            after = usage(pids)
            scale = 30.0 / self.args.idle
            res["idle_window_s"] = self.args.idle
            res["idle_cpu_s_per_30s"] = (after["cpu"] - before["cpu"]) * scale
            res["idle_wakeups_per_30s"] = (after["vol"] - before["vol"]) * scale
            res["idle_invol_per_30s"] = (after["invol"] - before["invol"]) * scale
            res.update({"mem100_" + k: v for k, v in memory(run.own()).items()})
            if peer.name == "respawn":
                res.update({k + "_100": v for k, v in self.reexec(run, peer).items()})
        finally:
            run.stop()
        return res

    # (4b) start time for 500, (7b) re-exec with 500
    def five_hundred(self, peer):
        res = {}
        run = Run(self, peer, "long", 500, "start500").start()
        try:
            t = run.all_running(180)
            if t is None:
                return {"error": "500 services did not all start within 180 s"}
            res["start500_s"] = t
            res.update({"mem500_" + k: v for k, v in memory(run.own()).items()})
            if peer.name == "respawn":
                time.sleep(0.5)
                res.update({k + "_500": v for k, v in self.reexec(run, peer).items()})
        finally:
            run.stop()
        return res

    def reexec(self, run, peer):
        """respawn.py only: `reexec` with every service running; no PID may change."""
        def pids():
            out, _ = peer.client(run.work, "status", "--json")
            return {s["name"]: s["pid"] for s in json.loads(out.stdout)["services"]}
        handoffs, walls = [], []
        before = pids()
        mark = self.fifo.mark()
        for _ in range(self.args.reexecs):
            out, wall = peer.client(run.work, "reexec")
            m = re.search(r"handoff ([\d.]+) ms", out.stdout)
            if out.returncode != 0 or not m:
                return {"reexec_error": (out.stdout + out.stderr).strip()[-300:]}
            handoffs.append(float(m.group(1)))
            walls.append(wall * 1000)
        after = pids()
        restarted = len(self.fifo.since(mark))
        same = before == after and None not in before.values()
        return {"reexec_handoff_ms": statistics.median(handoffs), "reexec_handoff_ms_max": max(handoffs),
                "reexec_wall_ms": statistics.median(walls), "reexec_pids_unchanged": same,
                "reexec_services_restarted": restarted, "reexec_count": len(handoffs)}

    # (8) scaling: respawn.py alone at 10, 100, 1000, 5000 services
    def scale(self, peer):
        if peer.name != "respawn":
            return {}
        res = {"scale": []}
        for n in self.args.scale:
            log("respawn: scale %d services" % n)
            try:
                point = self.scale_point(peer, n)
            except (OSError, subprocess.SubprocessError, ValueError) as exc:
                point = {"error": "%s: %s" % (type(exc).__name__, exc)}
            point["n"] = n
            log("respawn: scale %d: %s" % (n, json.dumps(point, default=str)))
            res["scale"].append(point)
        return res

    def scale_point(self, peer, n):
        """One size: every figure of the scaling table with n services running.
        The services keep respawn.py's default output (each stream a pipe to the
        supervisor's stdout, prefixed), so n services need 3n descriptors; the
        supervisor is started with the usual soft RLIMIT_NOFILE of 1024 (the hard
        limit left as the bench has it) and must raise its own."""
        run = Run(self, peer, "long", n, "scale%d" % n)
        run.services.prefixed = True
        run.preexec = soft_nofile(1024)
        run.start()
        try:
            t = run.all_running(max(60, n * 0.05))
            if t is None:
                return {"error": "the %d services did not all start" % n,
                        "supervisor_out": run.tail_out()}
            out = {"start_s": t}
            time.sleep(2.0)
            # what starting n such services costs this machine at all, while n run
            out["floor_start_s"] = self.floor(n)
            pid = run.proc.pid
            before = usage([pid])
            time.sleep(self.args.idle)
            after = usage([pid])
            out["idle_wakeups_per_30s"] = (after["vol"] - before["vol"]) * 30.0 / self.args.idle
            out["idle_cpu_s_per_30s"] = (after["cpu"] - before["cpu"]) * 30.0 / self.args.idle
            out["pss_mib"] = (pss_kib(pid) or 0) / 1024.0
            anon = pss_kib(pid, "Pss_Anon")
            out["pss_anon_mib"] = None if anon is None else anon / 1024.0
            out["rss_mib"] = (status_field(pid, "VmRSS") or 0) / 1024.0
            out["fds"] = count_fds(pid)
            out["nofile_soft"] = nofile_soft(pid)
            # status --json: the supervisor's side (one request on the socket, read to
            # its end) and the command as a user runs it (an interpreter starting too)
            sock = os.path.join(run.work, "r.sock")
            raw = [raw_request(sock, "status") for _ in range(5)]
            out["status_json_socket_ms"] = statistics.median(x[0] for x in raw) * 1000
            out["status_json_bytes"] = raw[0][1]
            walls = []
            for _ in range(3):
                r, wall = peer.client(run.work, "status", "--json")
                if r.returncode != 0:
                    return dict(out, error="status --json failed: %s" % r.stderr.strip()[-200:])
                walls.append(wall * 1000)
            out["status_json_ms"] = statistics.median(walls)
            out.update(self.scale_latency(run, n))
            out.update(self.scale_reexec(run, peer, sock))
            return out
        finally:
            run.stop()

    def scale_latency(self, run, n):
        """kill -> exec / kill -> announce of one service while n run, one kill at
        a time (each waits for its respawn), the victim drawn at random."""
        kills = self.args.scale_kills
        lat, lat_exec = [], []
        if self.execs:
            self.execs.forget()
        rng = random.Random(n)
        deadline = time.monotonic() + 30 + kills
        while len(lat) < kills and time.monotonic() < deadline:
            latest = run.latest()
            name = rng.choice(run.services.names)
            t_up, pid = latest[name]
            mark = self.fifo.mark()
            t0 = time.monotonic()
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                continue
            ev = self.fifo.wait(lambda e: next((x for x in e[mark:] if x[1] == name), None), 5)
            if not ev:
                continue
            t, _, newpid = ev
            lat.append((t - t0) * 1000)
            if self.execs:
                te = self.execs.first_exec_after(newpid, t0)
                if te is not None and te <= t:
                    lat_exec.append((te - t0) * 1000)
            time.sleep(rng.uniform(0.01, 0.04))
        out = {"kills": len(lat), "announce_p50_ms": pct(lat, 50), "announce_p99_ms": pct(lat, 99)}
        if lat_exec and len(lat_exec) >= 0.9 * len(lat):
            out.update({"exec_p50_ms": pct(lat_exec, 50), "exec_p99_ms": pct(lat_exec, 99)})
        return out

    def scale_reexec(self, run, peer, sock):
        """The handoff as the supervisor reports it, and as a client sees it: from
        starting `reexec` until `status` (a second command) shows the new image."""
        handoffs, seen = [], []
        first = json.loads(peer.client(run.work, "status", "--json")[0].stdout)
        pids = {s["name"]: s["pid"] for s in first["services"]}
        count = first["supervisor"]["reexecs"]
        mark = self.fifo.mark()
        for _ in range(self.args.reexecs):
            t0 = time.monotonic()
            r, _ = peer.client(run.work, "reexec", timeout=120)
            m = re.search(r"handoff ([\d.]+) ms", r.stdout)
            if r.returncode != 0 or not m:
                return {"reexec_error": (r.stdout + r.stderr).strip()[-300:]}
            handoffs.append(float(m.group(1)))
            while True:
                s, _ = peer.client(run.work, "status", "--json", timeout=120)
                try:
                    now = json.loads(s.stdout)
                except ValueError:
                    now = None
                if now and now["supervisor"]["reexecs"] > count:
                    count = now["supervisor"]["reexecs"]
                    break
                if time.monotonic() - t0 > 60:
                    return {"reexec_error": "status never showed the new image"}
            seen.append((time.monotonic() - t0) * 1000)
        after = {s["name"]: s["pid"] for s in now["services"]}
        return {"handoff_ms": statistics.median(handoffs), "reexec_seen_ms": statistics.median(seen),
                "reexec_pids_unchanged": after == pids and len(self.fifo.since(mark)) == 0}

    # (5) churn
    def churn(self, peer):
        run = Run(self, peer, "churn", 10, "churn").start()
        try:
            if run.all_running(60) is None:
                return {"error": "the 10 services did not all start within 60 s"}
            time.sleep(0.5)
            pids = run.own()
            mark = self.fifo.mark()
            before, t0 = usage(pids), time.monotonic()
            time.sleep(self.args.churn)
            after, t1 = usage(run.own()), time.monotonic()
            n = len(self.fifo.since(mark))
            cpu = after["cpu"] - before["cpu"]
            return {"churn_restarts_per_s": n / (t1 - t0), "churn_restarts": n,
                    "churn_cpu_ms_per_restart": cpu * 1000 / n if n else None,
                    "churn_cpu_s": cpu}
        finally:
            run.stop()

    # (6) output to a log file
    def make_data(self):
        if self.data_path:
            return
        self.data_path = os.path.join(self.scratch, "lines.txt")
        target = self.args.output_mb * 1000 * 1000
        filler = "abcdefghijklmnopqrstuvwxyz0123456789" * 4
        size, i = 0, 0
        with open(self.data_path, "w") as f:
            while size < target:
                chunk = "".join("%010d %s\n" % (j, filler[:(j * 7) % 120])
                                for j in range(i, i + 10000))
                f.write(chunk)
                size += len(chunk)
                i += 10000
        self.data_size = os.path.getsize(self.data_path)
        self.data_lines = i

    def output(self, peer):
        """Median of several runs (the VM's first touch of fresh page-cache pages
        makes single runs swing 2-3x), with the range; respawn.py also through its
        prefixed path (`out | line` on its own stdout)."""
        self.make_data()
        res = {}
        paths = [("output", False)] + ([("prefixed", True)] if peer.name == "respawn" else [])
        for key, prefixed in paths:
            runs = []
            for _ in range(self.args.output_runs):
                r = self.output_once(peer, prefixed)
                if "error" in r:
                    return dict(res, error=r["error"])
                runs.append(r)
            rates = sorted(r["mb_per_s"] for r in runs)
            cpus = sorted(r["cpu_s_per_100mb"] for r in runs)
            res.update({key + "_mb_per_s": statistics.median(rates),
                        key + "_mb_per_s_range": [rates[0], rates[-1]],
                        key + "_cpu_s_per_100mb": statistics.median(cpus),
                        key + "_cpu_s_per_100mb_range": [cpus[0], cpus[-1]],
                        key + "_intact": all(r["intact"] for r in runs),
                        key + "_runs": len(runs)})
            notes = [r["note"] for r in runs if r.get("note")]
            if notes:
                res[key + "_note"] = notes[0]
        res["output_mb"] = self.data_size / 1e6
        return res

    def output_once(self, peer, prefixed):
        run = Run(self, peer, "output", 1, "prefixed" if prefixed else "output")
        if prefixed:
            run.services.prefixed = True
            run.stdout_path = run.output_log = os.path.join(run.work, "prefixed.out")
        want = self.data_size + (len("out | ") * self.data_lines if prefixed else 0)
        run.start()
        try:
            mark = run.mark
            t0 = self.fifo.wait(lambda e: next((t for t, n, _ in e[mark:] if n == "out"), None), 60)
            if t0 is None:
                return {"error": "the output service did not start"}
            deadline = t0 + 300
            size = 0
            pids = run.peer.own_pids(run.proc.pid, logger=True)
            before = usage(pids)
            while time.monotonic() < deadline:
                try:
                    size = os.path.getsize(run.output_log)
                except OSError:
                    size = 0
                if size >= want:
                    break
                time.sleep(0.002)
            t1 = time.monotonic()
            cpu = usage(pids)["cpu"] - before["cpu"]
            if prefixed:
                intact = size == want and prefixed_equal(run.output_log, self.data_path, b"out | ")
            else:
                intact = size == want and files_equal(run.output_log, self.data_path)
            res = {"mb_per_s": self.data_size * (size / want) / 1e6 / (t1 - t0),
                   "intact": intact, "cpu_s_per_100mb": cpu * 1e8 / max(size, 1)}
            if size < want:
                res["note"] = "only %d of %d bytes arrived within 300 s" % (size, want)
            elif size > want or not intact:
                res["note"] = "the log differs from what the service wrote"
            return res
        finally:
            run.stop()

    # (6b) the floor for output: the bench itself moves the same bytes from the
    # same `cat` into a file, by splice where Python has it (one copy, in the kernel)
    def output_floor(self):
        self.make_data()
        runs = []
        for i in range(self.args.output_runs):
            path = os.path.join(self.scratch, "floor-out.log")
            r, w = os.pipe()
            try:
                fcntl.fcntl(r, getattr(fcntl, "F_SETPIPE_SZ", 1031), 1 << 20)
            except OSError:
                pass
            out = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            t0, c0 = time.monotonic(), time.thread_time()
            cat = subprocess.Popen([CAT, self.data_path], stdout=w)
            REAPER.note(cat.pid)
            os.close(w)
            size = 0
            while True:
                if hasattr(os, "splice"):
                    n = os.splice(r, out, 1 << 20)
                else:
                    data = os.read(r, 1 << 20)
                    n = len(data)
                    os.write(out, data)
                if not n:
                    break
                size += n
            t1, c1 = time.monotonic(), time.thread_time()
            cat.wait()
            os.close(r)
            os.close(out)
            os.unlink(path)
            runs.append((size / 1e6 / (t1 - t0), (c1 - c0) * 1e8 / max(size, 1)))
        rates, cpus = sorted(x[0] for x in runs), sorted(x[1] for x in runs)
        return {"output_floor_mb_per_s": statistics.median(rates),
                "output_floor_mb_per_s_range": [rates[0], rates[-1]],
                "output_floor_cpu_s_per_100mb": statistics.median(cpus)}

    # (9) the machine's own floor for starting n services: the bench spawns the
    # same scripts itself, one after another (posix_spawn, a process with few fds)
    def floor(self, n):
        folder = tempfile.mkdtemp(prefix="floor-%d-" % n, dir=self.scratch)
        services = Services(folder, self.fifo.path, "long", n, prefix="floor")
        want = set(services.names)
        mark = self.fifo.mark()
        pids = []
        t0 = time.monotonic()
        try:
            for name in services.names:
                path = services.scripts[name]
                pids.append(os.posix_spawn(path, [path], os.environ, setsid=True))
                REAPER.note(pids[-1])

            def done(events):
                seen = {}
                for t, name, _ in events[mark:]:
                    if name in want:
                        seen.setdefault(name, t)
                return max(seen.values()) if len(seen) == len(want) else None
            last = self.fifo.wait(done, max(60, n * 0.05))
            return None if last is None else last - t0
        finally:
            REAPER.kill_known(pids)
            for pid in pids:
                try:
                    os.waitpid(pid, 0)
                except ChildProcessError:
                    pass


def prefixed_equal(path, data_path, prefix):
    """Every line of path is prefix + the same line of data_path, in order."""
    with open(path, "rb") as fa, open(data_path, "rb") as fb:
        for a, b in zip(fa, fb):
            if a != prefix + b:
                return False
        return fa.read(1) == b"" and fb.read(1) == b""


def soft_nofile(limit):
    """preexec_fn: start a process with the usual soft RLIMIT_NOFILE (the bench
    raised its own), the hard limit as it is."""
    def setup():
        hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(limit, hard), hard))
    return setup


def nofile_soft(pid):
    try:
        with open("/proc/%d/limits" % pid) as f:
            for line in f:
                if line.startswith("Max open files"):
                    return int(line.split()[3])
    except (OSError, ValueError, IndexError):
        return None
    return None


def count_fds(pid):
    try:
        return len(os.listdir("/proc/%d/fd" % pid))
    except OSError:
        return None


def raw_request(path, cmd):
    """(seconds, bytes) of one request on the control socket, read to its end:
    the supervisor's own time, without a client interpreter starting."""
    import socket
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        t0 = time.monotonic()
        sock.connect(path)
        sock.sendall(json.dumps({"v": 1, "cmd": cmd, "args": {}}).encode() + b"\n")
        size = 0
        while True:
            data = sock.recv(1 << 20)
            if not data:
                break
            size += len(data)
        return time.monotonic() - t0, size
    finally:
        sock.close()


def files_equal(a, b):
    with open(a, "rb") as fa, open(b, "rb") as fb:
        while True:
            x, y = fa.read(1 << 20), fb.read(1 << 20)
            if x != y:
                return False
            if not x:
                return True


# ---------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------

ROWS = [
    # key, label, format, lower is better
    ("exec_p50_ms", "respawn kill->exec p50 (ms)", "%.2f", True),
    ("exec_p99_ms", "respawn kill->exec p99 (ms)", "%.2f", True),
    ("announce_p50_ms", "respawn kill->service up p50 (ms)", "%.2f", True),
    ("announce_p99_ms", "respawn kill->service up p99 (ms)", "%.2f", True),
    ("idle_wakeups_per_30s", "idle wakeups /30 s, 100 svc", "%.0f", True),
    ("idle_cpu_s_per_30s", "idle CPU s /30 s, 100 svc", "%.3f", True),
    ("mem100_pss_mib", "memory PSS, 100 svc (MiB)", "%.1f", True),
    ("mem100_rss_mib", "memory RSS, 100 svc (MiB)", "%.1f", True),
    ("mem100_processes", "supervisor processes, 100 svc", "%d", None),
    ("start100_s", "all running, 100 svc (s)", "%.3f", True),
    ("start500_s", "all running, 500 svc (s)", "%.3f", True),
    ("churn_restarts_per_s", "churn restarts/s (10 svc)", "%.0f", False),
    ("churn_cpu_ms_per_restart", "churn CPU per restart (ms)", "%.3f", True),
    ("output_mb_per_s", "output to log file (MB/s)", "%.0f", False),
    ("output_mb_per_s_range", "  range over the runs", "%.0f", None),
    ("output_cpu_s_per_100mb", "output CPU s per 100 MB", "%.3f", True),
    ("output_cpu_s_per_100mb_range", "  range over the runs", "%.3g", None),
    ("output_intact", "output lines intact", "%s", None),
    ("prefixed_mb_per_s", "output prefixed to stdout (MB/s)", "%.0f", False),
    ("prefixed_cpu_s_per_100mb", "prefixed CPU s per 100 MB", "%.3f", True),
    ("prefixed_intact", "prefixed lines intact", "%s", None),
    ("reexec_handoff_ms_100", "re-exec handoff, 100 svc (ms)", "%.1f", True),
    ("reexec_wall_ms_100", "re-exec command wall, 100 svc (ms)", "%.0f", True),
    ("reexec_handoff_ms_500", "re-exec handoff, 500 svc (ms)", "%.1f", True),
    ("reexec_wall_ms_500", "re-exec command wall, 500 svc (ms)", "%.0f", True),
    ("reexec_pids_unchanged_500", "re-exec: no PID changed (500)", "%s", None),
]


def fmt(value, spec):
    if value is None:
        return "-"
    if isinstance(value, list):
        return "..".join(spec % v for v in value)
    if spec == "%s":
        return "yes" if value is True else "NO" if value is False else str(value)
    try:
        return spec % value
    except TypeError:
        return str(value)


SCALE_ROWS = [
    ("start_s", "all running (s)", "%.3f"),
    ("floor_start_s", "  the bench's own spawn loop (s)", "%.3f"),
    ("exec_p50_ms", "restart kill->exec p50 (ms)", "%.2f"),
    ("exec_p99_ms", "restart kill->exec p99 (ms)", "%.2f"),
    ("announce_p50_ms", "restart kill->service up p50 (ms)", "%.2f"),
    ("announce_p99_ms", "restart kill->service up p99 (ms)", "%.2f"),
    ("handoff_ms", "re-exec handoff, supervisor (ms)", "%.1f"),
    ("reexec_seen_ms", "re-exec until status shows it (ms)", "%.0f"),
    ("reexec_pids_unchanged", "re-exec: no PID changed", "%s"),
    ("status_json_ms", "status --json command (ms)", "%.1f"),
    ("status_json_socket_ms", "status on the socket (ms)", "%.1f"),
    ("pss_mib", "memory PSS (MiB)", "%.1f"),
    ("pss_anon_mib", "memory Pss_Anon (MiB)", "%.1f"),
    ("rss_mib", "memory RSS (MiB)", "%.1f"),
    ("idle_wakeups_per_30s", "idle wakeups /30 s", "%.0f"),
    ("idle_cpu_s_per_30s", "idle CPU s /30 s", "%.3f"),
    ("fds", "open descriptors", "%d"),
    ("nofile_soft", "its soft RLIMIT_NOFILE", "%d"),
]


def render_scale(points):
    w0 = max(len(r[1]) for r in SCALE_ROWS) + 2
    out = ["", "scaling, respawn.py alone (started with a soft RLIMIT_NOFILE of 1024)"]
    head = "%-*s" % (w0, "services") + "".join("%10d" % p["n"] for p in points)
    out += [head, "-" * len(head)]
    for key, label, spec in SCALE_ROWS:
        vals = [p.get(key) for p in points]
        if all(v is None for v in vals):
            continue
        out.append("%-*s" % (w0, label) + "".join("%10s" % fmt(v, spec) for v in vals))
    for p in points:
        for k, v in p.items():
            if k.endswith("error"):
                out.append("ERROR scale %d %s: %s" % (p["n"], k, v))
    return out


def render(report):
    peers = report["peers"]
    names = [p for p in PEERS if p in peers]
    w0 = max(len(r[1]) for r in ROWS) + 2
    cols = {p: max(12, len(p) + 2) for p in names}
    out = []
    head = "%-*s" % (w0, "measurement") + "".join("%*s" % (cols[p], p) for p in names)
    out += [head, "-" * len(head)]
    for key, label, spec, _ in ROWS:
        vals = [peers[p].get("results", {}).get(key) for p in names]
        if all(v is None for v in vals):
            continue
        out.append("%-*s" % (w0, label) + "".join("%*s" % (cols[p], fmt(v, spec))
                                                  for p, v in zip(names, vals)))
    ver = "%-*s" % (w0, "version") + "".join(
        "%*s" % (cols[p], (peers[p].get("version") or "-")[:cols[p] - 1]) for p in names)
    out.append(ver)
    missing = [(p, peers[p]["missing"]) for p in names if peers[p].get("missing")]
    for p, why in missing:
        out.append("MISSING %s: %s" % (p, why))
    errors = [(p, k, v) for p in names for k, v in peers[p].get("results", {}).items()
              if k.endswith("error") and v]
    for p, k, v in errors:
        out.append("ERROR %s %s: %s" % (p, k, v))
    # ratios respawn/peer
    if "respawn" in peers and len(names) > 1:
        others = [p for p in names if p != "respawn"]
        out += ["", "ratio respawn.py / peer (below 1 is better for respawn.py where lower is "
                "better; above 1 where higher is better)"]
        head = "%-*s" % (w0, "measurement") + "".join("%*s" % (cols[p], p) for p in others)
        out += [head, "-" * len(head)]
        mine = peers["respawn"].get("results", {})
        for key, label, spec, lower in ROWS:
            if lower is None or mine.get(key) is None or key.startswith("reexec"):
                continue
            cells = []
            for p in others:
                theirs = peers[p].get("results", {}).get(key)
                if theirs in (None, 0) or not isinstance(theirs, (int, float)):
                    cells.append("-")
                else:
                    cells.append("%.3g" % (mine[key] / theirs))
            out.append("%-*s" % (w0, label) + "".join("%*s" % (cols[p], c)
                                                      for p, c in zip(others, cells)))
    scale = (peers.get("respawn") or {}).get("results", {}).get("scale")
    if scale:
        out += render_scale(scale)
        if report.get("plot"):
            out.append("plot: %s" % report["plot"])
    b = report.get("baseline") or {}
    if b.get("spawn_to_announce_ms_p50") is not None:
        out += ["", "service start alone (the bench spawns the script itself): p50 %.2f ms, "
                "p99 %.2f ms; included in every respawn latency above"
                % (b["spawn_to_announce_ms_p50"], b["spawn_to_announce_ms_p99"])]
    if b.get("exec_floor_p50_ms") is not None:
        out.append("the floor for kill->exec (a small process waits on a pidfd, reaps and posix_spawns "
                   "the script itself): p50 %.2f ms, p99 %.2f ms"
                   % (b["exec_floor_p50_ms"], b["exec_floor_p99_ms"]))
    if b.get("spawn_ms_fds_few") is not None and b.get("spawn_ms_fds_15000") is not None:
        out.append("one spawn (vfork until the child's exec, /bin/sh script) costs the parent "
                   "%.2f ms with few fds open, %.2f ms with 15 000 open"
                   % (b["spawn_ms_fds_few"], b["spawn_ms_fds_15000"]))
    if b.get("output_floor_mb_per_s") is not None:
        out.append("the floor for output (the bench splices the same cat's pipe into a file "
                   "itself): %.0f MB/s (range %s), %.3f CPU s per 100 MB"
                   % (b["output_floor_mb_per_s"], fmt(b["output_floor_mb_per_s_range"], "%.0f"),
                      b["output_floor_cpu_s_per_100mb"]))
    if b.get("memory_floor_bare_pss_mib") is not None:
        out.append("the floor for memory (the same interpreter, -I -S, sleeping): bare PSS %.1f "
                   "MiB (anon %s), with respawn.py's imports PSS %s MiB (anon %s)"
                   % (b["memory_floor_bare_pss_mib"],
                      fmt(b.get("memory_floor_bare_anon_mib"), "%.1f"),
                      fmt(b.get("memory_floor_imports_pss_mib"), "%.1f"),
                      fmt(b.get("memory_floor_imports_anon_mib"), "%.1f")))
    if b.get("floor100_s") is not None:
        out.append("the machine's floor for 'all running' (the bench spawns the same scripts "
                   "itself, one after another): 100 svc %.3f s, 500 svc %s s"
                   % (b["floor100_s"], fmt(b.get("floor500_s"), "%.3f")))
    m = report["machine"]
    out.append("machine: %s; %s CPUs; %s; %s; Python %s (%s); load before: %s; mode: %s"
               % (m["cpu"], m["cpus"], m["kernel"], m["mem"], m["python"], m["python_exe"],
                  m["loadavg"], report["mode"]))
    return "\n".join(out)


def machine():
    cpu = "?"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    mem = "?"
    try:
        with open("/proc/meminfo") as f:
            mem = "%.0f GiB RAM" % (int(f.readline().split()[1]) / 1024 ** 2)
    except (OSError, ValueError, IndexError):
        pass
    return {"cpu": cpu, "cpus": os.cpu_count(), "kernel": "Linux " + platform.release(),
            "mem": mem, "loadavg": " ".join("%.2f" % x for x in os.getloadavg())}


# ---------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------

def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="a shorter run, under three minutes")
    p.add_argument("--json", metavar="FILE", help="write the results as JSON")
    p.add_argument("--peers", default=",".join(PEERS),
                   help="comma-separated subset of %s" % ",".join(PEERS))
    p.add_argument("--only", default="latency,hundred,five_hundred,churn,output,scale",
                   help="comma-separated subset of measurements")
    p.add_argument("--venv", metavar="DIR", help="reuse a virtualenv that has supervisor and "
                   "circus instead of installing them into the scratch folder")
    p.add_argument("--kills", type=int, help="kills for the respawn latency (50; quick 20)")
    p.add_argument("--idle", type=float, help="idle window in seconds (30; quick 5)")
    p.add_argument("--churn", type=float, help="churn window in seconds (10; quick 3)")
    p.add_argument("--output-mb", type=int, help="MB the output service writes (200; quick 50)")
    p.add_argument("--output-runs", type=int, help="output runs per peer, the median shown (3; quick 2)")
    p.add_argument("--reexecs", type=int, help="re-execs per size (3; quick 1)")
    p.add_argument("--scale", default="10,100,1000,5000",
                   help="service counts of the scaling run (respawn.py alone)")
    p.add_argument("--scale-kills", type=int, help="kills per size in the scaling run (50; quick 20)")
    p.add_argument("--plot", metavar="PNG", default=os.path.join(HERE, "scaling.png"),
                   help="where the scaling run's plot goes (matplotlib in the scratch virtualenv)")
    p.add_argument("--respawn", metavar="FILE", default=RESPAWN,
                   help="the respawn.py to measure (default: the one beside bench/)")
    p.add_argument("--keep", action="store_true", help="keep the scratch folder (for debugging)")
    a = p.parse_args(argv)
    defaults = dict(kills=(20, 50), idle=(5.0, 30.0), churn=(3.0, 10.0), output_mb=(50, 200),
                    output_runs=(2, 3),
                    reexecs=(1, 3), scale_kills=(20, 50))
    for k, (quick, full) in defaults.items():
        if getattr(a, k) is None:
            setattr(a, k, quick if a.quick else full)
    a.peers = [x.strip() for x in a.peers.split(",") if x.strip()]
    a.scale = [int(x) for x in a.scale.split(",") if x.strip()]
    bad = [x for x in a.peers if x not in PEERS]
    if bad:
        p.error("unknown peer(s): %s" % ", ".join(bad))
    return a


def raise_nofile():
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = 65536 if hard == resource.RLIM_INFINITY else min(hard, 65536)
    if soft < want:
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))


def make_plot(report, png, venv):
    """The scaling curves as a PNG, drawn by bench/plot.py under an interpreter
    that has matplotlib: the virtualenv's, or a scratch one made for it."""
    pythons = [os.path.join(venv, "bin", "python")] if venv else []
    pythons.append(report["machine"].get("python_exe") or sys.executable)
    python = next((p for p in pythons if os.path.exists(p) and subprocess.run(
        [p, "-c", "import matplotlib"], capture_output=True).returncode == 0), None)
    scratch = None
    try:
        if python is None:
            scratch = tempfile.mkdtemp(prefix="respawn-bench-plot-")
            log("installing matplotlib from PyPI into %s" % scratch)
            subprocess.run([sys.executable, "-m", "venv", scratch], check=True, capture_output=True)
            r = subprocess.run([os.path.join(scratch, "bin", "pip"), "install", "-q", "matplotlib"],
                               capture_output=True, text=True, timeout=900)
            if r.returncode != 0:
                log("MISSING plot: pip install matplotlib failed: %s"
                    % (r.stderr.strip().splitlines() or ["?"])[-1])
                return None
            python = os.path.join(scratch, "bin", "python")
        with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
            json.dump(report, f, default=str)
        r = subprocess.run([python, os.path.join(HERE, "plot.py"), f.name, png],
                           capture_output=True, text=True, timeout=300)
        os.unlink(f.name)
        if r.returncode != 0:
            log("plot failed: %s" % r.stderr.strip()[-500:])
            return None
        return png
    except (OSError, subprocess.SubprocessError) as exc:
        log("plot failed: %s" % exc)
        return None
    finally:
        if scratch:
            shutil.rmtree(scratch, ignore_errors=True)


def on_signal(signum, frame):
    raise KeyboardInterrupt


def main(argv=None):
    global RESPAWN
    args = parse_args(argv)
    RESPAWN = os.path.abspath(args.respawn)
    raise_nofile()
    # SIGINT too: a shell starts a background job with SIGINT ignored
    for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(s, on_signal)
    started = time.monotonic()
    scratch = tempfile.mkdtemp(prefix="respawn-bench-")
    report = {"mode": "quick" if args.quick else "full", "machine": machine(), "peers": {},
              "settings": {k: getattr(args, k) for k in ("kills", "idle", "churn", "output_mb",
                                                         "reexecs")}}
    bench = None
    interrupted = False
    try:
        env = install_peers(scratch, args.peers, args.venv)
        report["machine"]["python"] = subprocess.run(
            [env["python"], "-c", "import platform; print(platform.python_version())"],
            capture_output=True, text=True).stdout.strip()
        report["machine"]["python_exe"] = env["python"]
        bench = Bench(args, scratch, env)
        report["baseline"] = bench.baseline()
        peers = [PEER_CLASSES[name](env) for name in args.peers]
        only = [x.strip() for x in args.only.split(",")]
        for peer in peers:
            entry = report["peers"][peer.name] = {"version": peer.version, "missing": peer.missing,
                                                  "results": {}}
            if peer.missing:
                log("%s: MISSING (%s)" % (peer.name, peer.missing))
                continue
            for step in ("latency", "hundred", "five_hundred", "churn", "output", "scale"):
                if step not in only:
                    continue
                log("%s: %s" % (peer.name, step))
                t = time.monotonic()
                try:
                    r = getattr(bench, step)(peer)
                except (OSError, subprocess.SubprocessError, ValueError) as exc:
                    r = {"error": "%s: %s" % (type(exc).__name__, exc)}
                if "error" in r:
                    r[step + "_error"] = r.pop("error")
                entry["results"].update(r)
                log("%s: %s done in %.1f s: %s" % (peer.name, step, time.monotonic() - t,
                                                   json.dumps(r, default=str)))
    except KeyboardInterrupt:
        interrupted = True
        log("interrupted: cleaning up")
    finally:
        REAPER.kill_known()
        if bench is not None:
            bench.fifo.close()
            if bench.execs:
                bench.execs.close()
        left = REAPER.alive(wait=3.0)
        if left:
            log("processes still alive after cleanup: %s" % left)
        if args.keep:
            log("scratch folder kept: %s" % scratch)
        else:
            shutil.rmtree(scratch, ignore_errors=True)
    report["elapsed_s"] = time.monotonic() - started
    scale = report["peers"].get("respawn", {}).get("results", {}).get("scale")
    if scale and args.plot:
        report["plot"] = make_plot(report, args.plot, args.venv)
    if report["peers"]:
        print(render(report))
        print("elapsed: %.0f s" % report["elapsed_s"])
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2, default=str)
    return 130 if interrupted else 0


if __name__ == "__main__":
    sys.exit(main())
