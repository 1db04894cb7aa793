"""Runs inside the sandbox's child interpreter (``python -I -S -B``) before the untrusted program.

Trusted set-up, in this order: import the stdlib modules the program names; resource limits; a private network namespace (where the OS
allows); drop to an unprivileged uid when started as root; an audit hook that refuses sockets,
new processes, writes outside the working directory, other processes' /proc entries and ctypes.
Then the program in ``program.py`` runs as ``__main__``. Configuration arrives as JSON in argv[1].
"""

import json
import os
import resource
import sys

CLONE_NEWNET = 0x40000000
CLONE_NEWUSER = 0x10000000
NOBODY = 65534


def _unshare(flags):
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    return libc.unshare(flags) == 0


def _limits(cfg):
    cpu = int(cfg["cpu_s"])
    resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu + 1))
    memory = int(cfg["memory_mb"]) * 2**20
    resource.setrlimit(resource.RLIMIT_AS, (memory, memory))
    size = int(cfg["max_file_mb"]) * 2**20
    resource.setrlimit(resource.RLIMIT_FSIZE, (size, size))
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    nproc = int(cfg["max_processes"])
    resource.setrlimit(resource.RLIMIT_NPROC, (nproc, nproc))


def _isolate():
    """Private network namespace; drop root. Returns the name of the network isolation used."""
    if os.getuid() == 0:
        net = "namespace" if _unshare(CLONE_NEWNET) else "audit-hook"
        os.setgroups([])
        os.setgid(NOBODY)
        os.setuid(NOBODY)
        return net
    return "namespace" if _unshare(CLONE_NEWUSER | CLONE_NEWNET) else "audit-hook"


def _preload(source):
    """Import the standard-library modules the program names, while they are still readable.

    After dropping to an unprivileged uid the interpreter's own directory may be unreadable
    (e.g. under /root), so imports are resolved first; only stdlib modules are loaded.
    """
    import ast

    try:
        tree = ast.parse(source)
    except SyntaxError:
        return
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    for name in sorted(names):
        if name.split(".")[0] in sys.stdlib_module_names:
            try:
                __import__(name)
            except Exception:
                pass


def _audit_hook(workdir):
    workdir = os.path.realpath(workdir)
    write_flags = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC
    own_proc = (f"/proc/{os.getpid()}", "/proc/self", "/proc/thread-self")
    denied_prefixes = ("socket.", "subprocess.", "os.exec", "os.posix_spawn", "os.spawn", "os.fork",
                       "os.forkpty", "os.system", "os.kill", "os.killpg", "ctypes.", "os.chmod", "os.chown",
                       "os.rename", "os.remove", "os.rmdir", "os.symlink", "os.link", "shutil.")

    def inside(path):
        real = os.path.realpath(path)
        return real == workdir or real.startswith(workdir + os.sep)

    def hook(event, args):
        if event.startswith(denied_prefixes):
            if event.startswith(("os.remove", "os.rmdir", "os.rename", "shutil.")) and all(
                    inside(a) for a in args if isinstance(a, (str, bytes, os.PathLike))):
                return
            raise PermissionError(f"sandbox: '{event}' is not allowed")
        if event == "open" and args and isinstance(args[0], (str, bytes, os.PathLike)):
            path, mode, flags = args[0], args[1] or "", args[2] or 0
            path = os.fsdecode(path)
            writing = any(c in str(mode) for c in "wax+") or bool(flags & write_flags)
            if writing and not inside(path):
                raise PermissionError(f"sandbox: writing outside the working directory is not allowed: {path}")
            real = os.path.realpath(path)
            if real.startswith("/proc/") and not real.startswith(own_proc):
                raise PermissionError(f"sandbox: reading {path} is not allowed")

    sys.addaudithook(hook)


def main():
    cfg = json.loads(sys.argv[1])
    workdir = os.getcwd()
    source = open(os.path.join(workdir, "program.py")).read()
    _preload(source)
    _limits(cfg)
    _isolate()
    _audit_hook(workdir)
    del sys.argv[1:]
    code = compile(source, "program.py", "exec")
    exec(code, {"__name__": "__main__", "__builtins__": __builtins__})


main()
