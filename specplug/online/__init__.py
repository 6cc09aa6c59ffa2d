"""Speculation that adapts while it serves: the observer contract (``observer``), and the
built-in observer, online distillation of the drafter into the target (``distill``: the
``adapt={"test_time": ...}`` setting), with its low-rank LM-head residual (``lowrank``)."""
