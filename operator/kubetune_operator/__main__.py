"""Entry point of the operator image: `python -m kubetune_operator` runs kopf with the settings from the environment."""

from __future__ import annotations

import gc
import os
import sys

# Objects the cyclic garbage collector may gather before a young collection: CPython's default is 700. A burst of
# FineTuneJobs allocates millions of short-lived objects that die young; a larger young generation lets them go
# before a collection walks them, and full collections of the long-lived indexes stay rare
# (docs/decisions/0002-operator-compact-bodies-and-gc.md; bench.operator_scale measures it).
YOUNG_GENERATION_THRESHOLD = 50_000
OLDER_GENERATION_THRESHOLDS = (50, 10)


def tune_garbage_collector() -> None:
    """Freeze what start-up made (modules, classes: never garbage) out of every later collection, and collect the
    young generation less often."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(YOUNG_GENERATION_THRESHOLD, *OLDER_GENERATION_THRESHOLDS)


def main() -> int:
    """Refuse bad settings with a message and exit code 2; otherwise run the operator until it is stopped."""
    import kopf

    from kubetune_operator import handlers
    from kubetune_operator.settings import OperatorSettings, SettingsError

    try:
        settings = OperatorSettings.from_env(os.environ)
    except SettingsError as error:
        print(f"kubetune-operator: {error}", file=sys.stderr)
        return 2
    kopf.configure(
        log_format=kopf.LogFormat.PLAIN,
        debug=settings.log_level == "debug",
        quiet=settings.log_level == "warning",
    )
    kopf_settings = kopf.OperatorSettings()
    handlers.configure_kopf(kopf_settings, settings)
    tune_garbage_collector()
    kopf.run(
        settings=kopf_settings,
        clusterwide=settings.clusterwide,
        namespaces=list(settings.namespaces),
        liveness_endpoint=settings.liveness_endpoint,
        # The startup handler takes these instead of reading the environment again (a second `auto` priority
        # would differ from the one configured above).
        memo=kopf.Memo(operator_settings=settings),
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
