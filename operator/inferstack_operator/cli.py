"""``inferstack-operator``: ``kopf run`` with this operator's handlers and sensible defaults.

Every argument is passed to ``kopf run`` (``--namespace``/``-n``, ``--all-namespaces``/``-A``,
``--standalone``, ``--peering``, ``--liveness``, ``--verbose``, ...). Added when absent:

* ``--all-namespaces``, or ``--namespace`` for each name in ``$INFERSTACK_OPERATOR_NAMESPACE``;
* ``--standalone`` (one operator replica; kopf peering needs its own CRDs), unless ``--peering``.
"""

from __future__ import annotations

import sys
from collections.abc import Mapping, Sequence

from inferstack_operator.config import OperatorSettings, SettingsError


HANDLERS_MODULE = "inferstack_operator.handlers"


def _has(args: Sequence[str], *options: str) -> bool:
    for arg in args:
        for option in options:
            if arg == option or (option.startswith("--") and arg.startswith(option + "=")):
                return True
            if not option.startswith("--") and arg.startswith(option) and len(arg) > len(option):
                return True  # short option with its value attached: -nfoo
    return False


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
    kopf.cli.main(args=args, prog_name="inferstack-operator")


if __name__ == "__main__":
    main()
