"""Emulated aarch64 devices: the rule for using them (check on ARM, time natively), QEMU user mode, the sysroot, the full-system image and VM."""
