"""Finding and loading the compiled CUDA library and registering its kernels on the ops (stub)."""

_STATUS = {"loaded": False, "reason": "not built yet"}


def load() -> bool:
    return False


def status() -> dict:
    return dict(_STATUS)
