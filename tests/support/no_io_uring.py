"""Runs a command with io_uring refused, as a container's seccomp profile may refuse it.

    python3 no_io_uring.py PROGRAM [ARG...]

Installs a seccomp filter that fails `io_uring_setup` (syscall 425 on every architecture since
Linux 5.1) with EPERM and allows every other call, then executes PROGRAM. Exits with 97 and a
message when the filter cannot be installed, so that a test cannot mistake that for the
program's answer.
"""

import ctypes
import os
import struct
import sys

PR_SET_NO_NEW_PRIVS = 38
PR_SET_SECCOMP = 22
SECCOMP_MODE_FILTER = 2
IO_URING_SETUP = 425
EPERM = 1


def insn(code, k, jt=0, jf=0):
    return struct.pack("HBBI", code, jt, jf, k)


def main():
    libc = ctypes.CDLL(None, use_errno=True)
    prog = b"".join(
        [
            insn(0x20, 0),  # ld [0]: seccomp_data.nr
            insn(0x15, IO_URING_SETUP, 0, 1),  # jeq io_uring_setup
            insn(0x06, 0x00050000 | EPERM),  # ret SECCOMP_RET_ERRNO | EPERM
            insn(0x06, 0x7FFF0000),  # ret SECCOMP_RET_ALLOW
        ]
    )
    buf = ctypes.create_string_buffer(prog, len(prog))

    class SockFprog(ctypes.Structure):
        _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]

    fprog = SockFprog(len(prog) // 8, ctypes.addressof(buf))
    if libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0:
        print(f"no_io_uring.py: PR_SET_NO_NEW_PRIVS failed: errno {ctypes.get_errno()}", file=sys.stderr)
        sys.exit(97)
    if libc.prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, ctypes.byref(fprog), 0, 0) != 0:
        print(f"no_io_uring.py: seccomp filter refused: errno {ctypes.get_errno()}", file=sys.stderr)
        sys.exit(97)
    os.execvp(sys.argv[1], sys.argv[1:])


if __name__ == "__main__":
    main()
