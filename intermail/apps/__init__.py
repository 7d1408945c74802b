"""Per-kind glue: build a server kind's app from the Config and one ``[[instance]]`` entry.

:func:`service_main` is the whole ``main()`` of every ``services/<kind>d.py``::

    python -m services.dird --config cluster.toml --instance dir1 [--data DIR] [--ready-file F] [--init]

It loads the Config (``--data`` overrides ``cluster.data_dir``), sets up
logging for the instance, builds the app and runs it on the runner until
SIGTERM.  The ready file defaults to ``<data_dir>/run/<name>.ready``.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence

from intermail import config as config_module
from intermail.config import ConfigError
from intermail.log import setup_logging
from intermail.net.runner import App, EXIT_START_FAILED, run


def service_main(kind: str, build: Callable[..., App], argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog=f"{kind}d", description=f"run one {kind} instance")
    parser.add_argument("--config", required=True, help="the cluster's topology TOML")
    parser.add_argument("--instance", required=True, help="the [[instance]] name to run")
    parser.add_argument("--data", default=None, help="cluster state directory (overrides cluster.data_dir)")
    parser.add_argument("--ready-file", default=None, help="where to publish the bound ports")
    parser.add_argument("--init", action="store_true",
                        help="create this instance's state if it has none (first start); without it an"
                             " instance whose state is missing refuses to start rather than serve nothing")
    args = parser.parse_args(argv)
    try:
        config = config_module.load(args.config)
        if args.data:
            config = config.with_data_dir(args.data)
        me = config.instance(args.instance)
        if me.kind != kind:
            raise ConfigError(f"instance {args.instance!r} is a {me.kind}, not a {kind}")
        app = build(config, args.instance, init=args.init)
    except KeyError:
        print(f"{kind}d: no instance {args.instance!r} in {args.config}", file=sys.stderr)
        return EXIT_START_FAILED
    except ConfigError as exc:
        print(f"{kind}d: {exc}", file=sys.stderr)
        return EXIT_START_FAILED
    setup_logging(args.instance, config.log.level, fmt=config.log.format)
    return run(app, loop=config.runner.loop, instance=args.instance, drain_timeout=config.runner.drain_timeout,
               ready_file=args.ready_file or config.ready_file(args.instance))
