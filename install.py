"""Run by the WebUI at launch, in its own process. SEG needs nothing beyond the WebUI's own PyTorch, so
nothing is installed; this only reads PyTorch's version (without importing it, to keep launch fast) and
says plainly when SEG cannot run."""

from __future__ import annotations

from importlib import metadata

MINIMUM_TORCH = (1, 13)


def torch_version() -> tuple[int, ...] | None:
    try:
        text = metadata.version("torch")
    except metadata.PackageNotFoundError:
        return None
    return tuple(int(part) for part in text.split("+")[0].split(".")[:2] if part.isdigit())


def main() -> None:
    version = torch_version()
    needed = ".".join(map(str, MINIMUM_TORCH))
    if version is None:
        print(f"[SEG] PyTorch is not installed here; Smoothed Energy Guidance needs PyTorch {needed}+.")
    elif version < MINIMUM_TORCH:
        print(f"[SEG] PyTorch {'.'.join(map(str, version))} is too old; Smoothed Energy Guidance needs {needed}+.")


if __name__ == "__main__":
    main()
