"""Page sharing: content index, store, merge planning, and the merge agent inside QEMU.

``harness.sharing.agent`` builds the preloaded C agent (``agent.c``) and talks to it.
"""
