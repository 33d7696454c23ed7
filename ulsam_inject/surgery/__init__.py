"""Changing a model: positions -> plan -> rewrite, the one-call :func:`inject`, its report."""
