"""The python grader's process: run as `python -I sandbox_child.py` by `core.graders.sandbox`, never imported.

It reads `{"source", "pairs": [[sample, item], ...], "limits": {...}, "deny": [paths]}` on stdin, confines itself,
then calls the user's `grade(sample, item)` once per pair and writes `[{"score"} | {"error"}, ...]` as JSON on the
stdout it was given (the user's own prints go to stderr). The confinement, in order:
1. rlimits: address space (RLIMIT_AS), CPU seconds (RLIMIT_CPU), file size (RLIMIT_FSIZE), no core files.
2. a new, empty network namespace (`unshare(CLONE_NEWNET)`, needs root or CAP_SYS_ADMIN): no interface but a
   down loopback, so no connection can be made at all. Where that is refused, only step 3 guards the network.
3. an audit hook (PEP 578, cannot be removed from Python) refusing sockets' connect/bind/sendto, new processes
   (subprocess, os.system, exec, spawn, fork), ctypes, writes outside the temporary working folder, and any
   access to the denied folders (the artifact store, FT_HOME).
"""

import json
import os
import sys
import traceback

CLONE_NEWNET = 0x40000000
_BLOCKED = {
    "socket.connect", "socket.bind", "socket.sendto", "socket.sendmsg", "socket.getaddrinfo",
    "subprocess.Popen", "os.system", "os.exec", "os.posix_spawn", "os.spawn", "os.fork", "os.forkpty",
    "pty.spawn", "ctypes.dlopen", "ctypes.dlsym", "ctypes.cdata", "ctypes.call_function", "os.kill", "os.killpg",
    "webbrowser.open", "os.chroot", "sys._current_frames",
}  # fmt: skip
_PATH_EVENTS = {"os.listdir", "os.scandir", "os.chdir", "glob.glob", "os.walk"}
_WRITE_EVENTS = {"os.remove", "os.rename", "os.rmdir", "os.mkdir", "os.chmod", "os.chown", "os.link",
                 "os.symlink", "os.truncate", "os.utime", "shutil.rmtree", "shutil.move", "shutil.copyfile"}  # fmt: skip
_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC


def _limit(limits):
    import resource

    resource.setrlimit(resource.RLIMIT_AS, (limits["memory_bytes"], limits["memory_bytes"]))
    cpu = int(limits["cpu_seconds"])
    resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu + 1))
    resource.setrlimit(resource.RLIMIT_FSIZE, (limits["file_bytes"], limits["file_bytes"]))
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))


def _isolate_network():
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    return libc.unshare(CLONE_NEWNET) == 0


def _inside(path, roots):
    return any(path == root or path.startswith(root.rstrip(os.sep) + os.sep) for root in roots)


def _real(path):
    if isinstance(path, int):
        return None
    return os.path.realpath(os.fsdecode(path))


def _hook(cwd, deny):
    def hook(event, args):
        if event in _BLOCKED:
            raise PermissionError(f"{event} is not allowed in a python grader")
        if event == "open" or event in _PATH_EVENTS or event in _WRITE_EVENTS:
            path = _real(args[0]) if args else None
            if path is not None and _inside(path, deny):
                raise PermissionError(f"access to {path} is not allowed in a python grader")
            writes = event in _WRITE_EVENTS or (event == "open" and _writes(args))
            if writes and path is not None and not _inside(path, [cwd]):
                raise PermissionError(f"writing {path} is not allowed (only the working folder)")

    return hook


def _writes(args):
    mode, flags = (args[1] if len(args) > 1 else None), (args[2] if len(args) > 2 else 0)
    if isinstance(mode, str) and any(c in mode for c in "wax+"):
        return True
    return bool(isinstance(flags, int) and flags & _WRITE_FLAGS)


def _grade_all(grade, pairs):
    results = []
    for sample, item in pairs:
        try:
            score = grade(sample, item)
            if isinstance(score, bool) or not isinstance(score, (int, float)):
                raise TypeError(f"grade() must return a number, not {type(score).__name__}")
            results.append({"score": float(score)})
        except BaseException as exc:  # the user's error, whatever it is, is the sample's result
            results.append({"error": _short_traceback(exc)})
    return results


def _short_traceback(exc):
    """The traceback of the user's code only (this file's frames left out), at most 4000 characters."""
    tb = exc.__traceback__
    while tb is not None and tb.tb_frame.f_code.co_filename == __file__:
        tb = tb.tb_next
    return "".join(traceback.format_exception(type(exc), exc, tb)).strip()[-4000:]


def main():
    request = json.loads(sys.stdin.read())
    out = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)  # the user's prints go to stderr, never into the results
    sys.stdout = sys.stderr
    _limit(request["limits"])
    network = _isolate_network()
    import socket  # noqa: F401  (imported before the hook: its import opens files the hook would allow anyway)

    sys.addaudithook(_hook(os.getcwd(), request["deny"]))
    namespace = {"__name__": "grader"}
    try:
        exec(compile(request["source"], "grader.py", "exec"), namespace)
        grade = namespace.get("grade")
        if not callable(grade):
            raise NameError("the source defines no function grade(sample, item)")
        results = _grade_all(grade, request["pairs"])
    except BaseException as exc:
        results = [{"error": _short_traceback(exc)} for _ in request["pairs"]]
    out.write(json.dumps({"network_namespace": network, "results": results}))
    out.flush()


main()
