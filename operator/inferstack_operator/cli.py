"""``inferstack-operator``: ``kopf run`` with this operator's handlers and sensible defaults.

Every argument is passed to ``kopf run`` (``--namespace``/``-n``, ``--all-namespaces``/``-A``,
``--standalone``, ``--peering``, ``--liveness``, ``--verbose``, ...). Added when absent:

* ``--all-namespaces``, or ``--namespace`` for each name in ``$INFERSTACK_OPERATOR_NAMESPACE``;
* ``--standalone`` (one operator replica; kopf peering needs its own CRDs), unless ``--peering``.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping, Sequence

from inferstack_operator.config import ENV_WATCH_NAMESPACE, OperatorSettings, SettingsError


HANDLERS_MODULE = "inferstack_operator.handlers"


def _has(args: Sequence[str], *options: str) -> bool:
    for arg in args:
        for option in options:
            if arg == option or (option.startswith("--") and arg.startswith(option + "=")):
                return True
            if not option.startswith("--") and arg.startswith(option) and len(arg) > len(option):
                return True  # short option with its value attached: -nfoo
    return False


def named_namespaces(args: Sequence[str]) -> list[str]:
    """The namespaces given with ``--namespace``/``-n`` (any of kopf's spellings)."""
    names, it = [], iter(args)
    for arg in it:
        if arg in ("--namespace", "-n"):
            names.append(next(it, ""))
        elif arg.startswith("--namespace="):
            names.append(arg.split("=", 1)[1])
        elif arg.startswith("-n") and len(arg) > 2 and not arg.startswith("--"):
            names.append(arg[2:])
    return [n for n in names if n]


def build_argv(args: Sequence[str], env: Mapping[str, str] | None = None) -> list[str]:
    """The ``kopf`` argv for ``inferstack-operator ARGS``; raises ``SettingsError``."""
    settings = OperatorSettings.from_env(env)
    argv = ["run", "-m", HANDLERS_MODULE]
    if _has(args, "--help", "-h"):
        return ["run", "--help"]
    if not _has(args, "--namespace", "-n", "--all-namespaces", "-A"):
        if settings.watch_namespaces:
            for name in settings.watch_namespaces:
                argv += ["--namespace", name]
        else:
            argv.append("--all-namespaces")
    if not _has(args, "--standalone", "--peering", "-P"):
        argv.append("--standalone")
    return argv + list(args)


def main(argv: Sequence[str] | None = None) -> None:
    import kopf.cli  # late: keeps --help of build_argv cheap to test

    try:
        args = build_argv(sys.argv[1:] if argv is None else argv)
    except SettingsError as exc:
        sys.exit(f"inferstack-operator: {exc}")
    namespaces = named_namespaces(args)
    if namespaces and not _has(args, "--all-namespaces", "-A"):
        # The handlers read the watched namespaces from the settings: with them, kopf scans no
        # cluster-scoped API (CRDs, namespaces), so the chart grants no cluster-scoped rule.
        os.environ[ENV_WATCH_NAMESPACE] = ",".join(namespaces)
    kopf.cli.main(args=args, prog_name="inferstack-operator")


if __name__ == "__main__":
    main()
