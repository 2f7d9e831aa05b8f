"""Starts one container the way a container runtime does, inside the mount
namespace the pod runner made for it (run under `unshare --mount`, in the
pod's network namespace):

1. the image's file system as an overlay (its own changes go to a scratch
   layer), with a mount point for every volume;
2. each volume bound at its mount path (read-only where the pod says so),
   the kubelet's /etc/hosts, /etc/resolv.conf and /etc/hostname, and a
   minimal /dev, /proc and /sys;
3. the root made read-only when `readOnlyRootFilesystem` is set;
4. chroot, the pod's groups, group and user, no new privileges;
5. exec of the container's command with exactly the container's
   environment.

    python3 container_init.py SPEC.json

Exit 128 with a line on stderr when the container cannot be made (as a
runtime reports CreateContainerError); otherwise this process becomes the
container's first process.
"""

import ctypes
import json
import os
import subprocess
import sys

PR_SET_NO_NEW_PRIVS = 38


def fail(what):
    print(f"container_init: {what}", file=sys.stderr, flush=True)
    sys.exit(128)


def mount(*args):
    r = subprocess.run(["mount", *args], capture_output=True, text=True)
    if r.returncode != 0:
        fail(f"mount {' '.join(args)}: {r.stderr.strip()}")


def make_point(path, is_file):
    if os.path.lexists(path):
        return
    parent = os.path.dirname(path)
    os.makedirs(parent, exist_ok=True)
    if is_file:
        open(path, "a").close()
    else:
        os.makedirs(path, exist_ok=True)


def find(command, env, root):
    if "/" in command:
        return command
    for d in env.get("PATH", "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin").split(":"):
        p = os.path.join(d, command)
        if os.access(os.path.join(root, p.lstrip("/")), os.X_OK):
            return p
    fail(f'exec: "{command}": executable file not found in $PATH')


def main():
    with open(sys.argv[1]) as f:
        spec = json.load(f)
    root = spec["merged"]
    mount("-t", "overlay", "overlay", "-o",
          f"lowerdir={spec['lower']},upperdir={spec['upper']},workdir={spec['work']}", root)
    # The kernel's and the runtime's parts first, then the volumes.
    for d in ("proc", "sys", "dev"):
        make_point(os.path.join(root, d), False)
    mount("--bind", "/proc", os.path.join(root, "proc"))
    mount("--bind", "/sys", os.path.join(root, "sys"))
    mount("-o", "remount,bind,ro", os.path.join(root, "sys"))
    dev = os.path.join(root, "dev")
    mount("-t", "tmpfs", "-o", "mode=755,size=65536k", "tmpfs", dev)
    for node in ("null", "zero", "full", "random", "urandom", "tty"):
        make_point(os.path.join(dev, node), True)
        mount("--bind", f"/dev/{node}", os.path.join(dev, node))
    os.makedirs(os.path.join(dev, "shm"), exist_ok=True)
    mount("-t", "tmpfs", "-o", "mode=1777,size=65536k", "tmpfs", os.path.join(dev, "shm"))
    for m in spec["mounts"]:
        target = os.path.join(root, m["path"].lstrip("/"))
        make_point(target, m["file"])
        mount("--bind", m["source"], target)
        if m["readonly"]:
            mount("-o", "remount,bind,ro", target)
    if spec["readonly_root"]:
        mount("-o", "remount,ro", root)
    env = spec["env"]
    argv = spec["argv"]
    if not argv:
        fail("no command: the image has no entry point and the pod gives none")
    path = find(argv[0], env, root)
    os.chroot(root)
    os.chdir(spec["cwd"] or "/")
    os.setgroups(spec["groups"])
    os.setgid(spec["gid"])
    os.setuid(spec["uid"])
    if spec["no_new_privs"]:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0:
            fail("prctl(PR_SET_NO_NEW_PRIVS) failed")
    try:
        os.execve(path, argv, env)
    except OSError as e:
        fail(f"exec {path}: {e}")


if __name__ == "__main__":
    main()
