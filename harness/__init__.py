"""satori: enlightened page sharing for QEMU guests (a reproduction of Satori, USENIX ATC 2009)."""

__version__ = "0.1.0"
