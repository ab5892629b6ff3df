"""Fault injection for tests/test_faults.py: `dicompress` commands run in child processes of a fork server, each
optionally with a hook that SIGKILLs it, pauses it, or makes a call fail with ENOSPC at the N-th call of a chosen
function. No production hook is needed: the child patches the function, then calls `dicompress.cli.main`.

Why a fork server: importing dicompress (torch, diffusers) takes about 10 s on the CI machine, a tiny recipe runs in
2. The server (this file run as a script) imports `dicompress.cli` once; every command is a fresh `os.fork()` of it,
a separate process with its own pid, its own file locks and no cleanup on SIGKILL, exactly as a killed
`dicompress run` process. The server reaps its children, so a killed child's pid is dead when the test looks.

Read-only destinations: when `unshare -rm` works here (a user + mount namespace, root or not), the server runs
inside one and bind-mounts the requested paths read-only around a command; otherwise, for a non-root user, it
chmods them 0o555 (root ignores modes: `ro_mode` is then None and the tests skip).

Protocol (one JSON object per line): {"op": "start", "argv": [...], "hook": HOOK|null, "out": FILE, "ro": [...]}
-> {"pid": N}; {"op": "wait", "pid": N, "timeout": S} -> {"rc": RC, "timed_out": bool} (RC negative: killed by
that signal). HOOK: {"target": "module:Attr.attr", "at": N, "action": ACTION, "fired": FILE, "arm": {"target",
"at"}|null, "path_arg": I, "go": FILE}; ACTION is kill (before the N-th call), kill_after (after it returns),
truncate_kill (after it returns: the file in argument `path_arg` is cut to half its size, then kill), enospc
(the call writes half its file and raises OSError ENOSPC) or pause (create `fired`, wait for `go`, go on).
With `arm`, calls of `target` are counted only after `arm.target`'s `arm.at`-th call began.
"""
from __future__ import annotations

import errno
import importlib
import json
import os
import select
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MOUNT_PROBE_FAILED = "mount probe failed"


# ---------------------------------------------------------------------------------------------- the child side
def _resolve(target: str):
    """(owner, attribute name, current value) of "package.module:Class.attr" (or "module:function")."""
    mod_name, _, path = target.partition(":")
    owner = importlib.import_module(mod_name)
    *outer, name = path.split(".")
    for part in outer:
        owner = getattr(owner, part)
    if not hasattr(owner, name):
        raise LookupError(f"hook target {target} does not exist (renamed in the production code?)")
    return owner, name, getattr(owner, name)


def _patch(target: str, before=None, after=None) -> None:
    """Wrap `target`: before(args, kwargs) runs ahead of each call, after(args, kwargs, result) once it returned."""
    owner, name, real = _resolve(target)

    def wrapper(*args, **kwargs):
        if before is not None:
            before(args, kwargs)
        result = real(*args, **kwargs)
        if after is not None:
            after(args, kwargs, result)
        return result

    setattr(owner, name, wrapper)


def _kill() -> None:
    sys.stdout.flush()
    sys.stderr.flush()
    os.kill(os.getpid(), signal.SIGKILL)


def install(hook: dict) -> None:
    """Patch this process as `hook` says (see the module docstring)."""
    armed = {"on": hook.get("arm") is None}
    calls = {"n": 0}
    at, action, fired = hook["at"], hook["action"], Path(hook["fired"])
    if hook.get("arm"):
        arm_calls = {"n": 0}

        def arm(args, kwargs):
            arm_calls["n"] += 1
            if arm_calls["n"] == hook["arm"]["at"]:
                armed["on"] = True
        _patch(hook["arm"]["target"], before=arm)

    def path_of(args, kwargs) -> Path:
        i = hook.get("path_arg", 1)
        return Path(args[i] if len(args) > i else next(iter(v for k, v in kwargs.items() if k in
                                                                 ("filename", "path", "dst"))))

    def fire(info: dict) -> None:
        fired.write_text(json.dumps({"target": hook["target"], "call": calls["n"], "action": action, **info}))

    def this_call() -> bool:
        if not armed["on"]:
            return False
        calls["n"] += 1
        return calls["n"] == at

    def before(args, kwargs):
        if action in ("kill", "pause") and this_call():
            fire({})
            if action == "kill":
                _kill()
            go = Path(hook["go"])
            deadline = time.monotonic() + 120
            while not go.exists() and time.monotonic() < deadline:
                time.sleep(0.05)

    def after(args, kwargs, result):
        if action in ("kill_after", "truncate_kill", "enospc") and this_call():
            info = {}
            if action in ("truncate_kill", "enospc"):
                path = path_of(args, kwargs)
                size = path.stat().st_size
                with open(path, "r+b") as f:
                    f.truncate(size // 2)
                info = {"path": str(path), "size": size}
            fire(info)
            if action == "enospc":
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
            _kill()

    _patch(hook["target"], before=before, after=after)


def _child(req: dict) -> int:
    """Runs in the forked child: redirect output, install the hook, run the CLI; returns the exit code."""
    fd = os.open(req["out"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)
    try:
        if req.get("hook"):
            install(req["hook"])
        from dicompress.cli import main
        main(req["argv"], prog_name="dicompress")
        return 0
    except SystemExit as e:
        if e.code is None or isinstance(e.code, int):
            return e.code or 0
        print(e.code, file=sys.stderr)
        return 1
    except BaseException:                 # what the interpreter would print for an uncaught exception
        import traceback
        traceback.print_exc()
        return 1


# ---------------------------------------------------------------------------------------------- the server side
def _ro(paths: list[str], mode: str | None, on: bool) -> None:
    for p in paths:
        if mode == "mount":
            if on:
                subprocess.run(["mount", "--bind", p, p], check=True)
                subprocess.run(["mount", "-o", "remount,bind,ro", p], check=True)
            else:
                subprocess.run(["umount", p], check=True)
        elif mode == "chmod":
            for q in [Path(p), *Path(p).rglob("*")]:
                if q.is_dir():
                    q.chmod(0o555 if on else 0o755)


def _probe_ro(mode: str | None) -> str | None:
    """Whether `mode` really makes a directory unwritable for this process."""
    if mode is None:
        return None
    d = Path(os.environ.get("TMPDIR", "/tmp")) / f"dicompress-ro-probe-{os.getpid()}"
    d.mkdir()
    try:
        _ro([str(d)], mode, True)
        try:
            (d / "x").write_text("")
            return None
        except OSError:
            return mode
        finally:
            _ro([str(d)], mode, False)
    except (OSError, subprocess.CalledProcessError):
        return None
    finally:
        shutil.rmtree(d, ignore_errors=True)


def serve() -> None:
    os.environ["OMP_NUM_THREADS"] = "1"
    import torch
    torch.set_num_threads(1)
    import dicompress.cli  # noqa: F401  (the import the children share)
    mode = _probe_ro(os.environ.get("FAULTS_RO_MODE") or None)
    print(json.dumps({"ready": True, "ro_mode": mode}), flush=True)
    children: dict[int, list[str]] = {}
    for line in sys.stdin:
        req = json.loads(line)
        if req["op"] == "start":
            ro = req.get("ro") or []
            if ro and mode is None:
                print(json.dumps({"error": "no read-only mode here"}), flush=True)
                continue
            _ro(ro, mode, True)
            pid = os.fork()
            if pid == 0:
                code = _child(req)
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(code)
            children[pid] = ro
            print(json.dumps({"pid": pid}), flush=True)
        elif req["op"] == "wait":
            pid, deadline = req["pid"], time.monotonic() + req.get("timeout", 300)
            timed_out = False
            while True:
                done, status = os.waitpid(pid, os.WNOHANG)
                if done:
                    break
                if time.monotonic() > deadline:
                    timed_out = True
                    os.kill(pid, signal.SIGKILL)
                    _, status = os.waitpid(pid, 0)
                    break
                time.sleep(0.02)
            _ro(children.pop(pid), mode, False)
            print(json.dumps({"rc": os.waitstatus_to_exitcode(status), "timed_out": timed_out}), flush=True)


# ---------------------------------------------------------------------------------------------- the test side
class ForkServer:
    """The test's handle on the server: `run(argv, hook=...)` -> Result; `start` / `wait` for overlapping runs."""

    def __init__(self, logs: Path):
        self.logs = Path(logs)
        self.logs.mkdir(parents=True, exist_ok=True)
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
        env.pop("DICOMPRESS_CACHE", None)            # every recipe here names its cache_dir
        cmd = [sys.executable, str(Path(__file__).resolve())]
        if shutil.which("unshare") and shutil.which("mount"):
            ns = subprocess.run(["unshare", "-rm", "true"], capture_output=True)
            if ns.returncode == 0:
                cmd = ["unshare", "-rm", *cmd]
                env["FAULTS_RO_MODE"] = "mount"
        if "FAULTS_RO_MODE" not in env and os.geteuid() != 0:
            env["FAULTS_RO_MODE"] = "chmod"
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env,
                                     cwd=str(ROOT))
        hello = self._read(120)
        self.ro_mode = hello["ro_mode"]
        self._n = 0

    def _read(self, timeout: float) -> dict:
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
        if not ready:
            raise TimeoutError("the fault-injection fork server did not answer")
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"the fault-injection fork server died (exit {self.proc.wait()})")
        return json.loads(line)

    def _ask(self, req: dict, timeout: float) -> dict:
        self.proc.stdin.write(json.dumps(req) + "\n")
        self.proc.stdin.flush()
        return self._read(timeout)

    def start(self, argv: list, hook: dict | None = None, ro: list | None = None) -> "Started":
        self._n += 1
        out = self.logs / f"run{self._n}.log"
        got = self._ask({"op": "start", "argv": [str(a) for a in argv], "hook": hook, "out": str(out),
                         "ro": [str(p) for p in ro or []]}, 30)
        if "error" in got:
            raise RuntimeError(got["error"])
        return Started(self, got["pid"], out, hook)

    def run(self, argv: list, hook: dict | None = None, ro: list | None = None, timeout: float = 240) -> "Result":
        return self.start(argv, hook, ro).wait(timeout)

    def close(self) -> None:
        self.proc.stdin.close()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


class Started:
    def __init__(self, server: ForkServer, pid: int, out: Path, hook: dict | None):
        self.server, self.pid, self.out, self.hook = server, pid, out, hook

    def wait(self, timeout: float = 240) -> "Result":
        got = self.server._ask({"op": "wait", "pid": self.pid, "timeout": timeout}, timeout + 30)
        fired = None
        if self.hook and Path(self.hook["fired"]).exists():
            fired = json.loads(Path(self.hook["fired"]).read_text())
        return Result(self.pid, got["rc"], got["timed_out"], self.out.read_text(errors="replace"), fired)


class Result:
    def __init__(self, pid: int, rc: int, timed_out: bool, output: str, fired: dict | None):
        self.pid, self.rc, self.timed_out, self.output, self.fired = pid, rc, timed_out, output, fired

    def __repr__(self) -> str:
        return f"Result(pid={self.pid}, rc={self.rc}, fired={self.fired}, output tail:\n{self.output[-3000:]})"


def hook(target: str, at: int, action: str, flags: Path, arm: tuple[str, int] | None = None,
         path_arg: int = 1) -> dict:
    """A hook for `ForkServer.start` (its marker files under `flags`)."""
    flags.mkdir(parents=True, exist_ok=True)
    return {"target": target, "at": at, "action": action, "fired": str(flags / "fired.json"),
            "go": str(flags / "go"), "path_arg": path_arg,
            "arm": {"target": arm[0], "at": arm[1]} if arm else None}


if __name__ == "__main__":
    serve()
