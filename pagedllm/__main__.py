"""`python -m pagedllm ...` runs the `pagedllm` command (see pagedllm.cli)."""

from pagedllm.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
