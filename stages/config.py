"""firststage config: show the resolved config, or list every key with its default and meaning."""

from __future__ import annotations

import argparse

import yaml

from pipeline.config import config_to_dict, describe_fields, load_config
from stages.common import add_config_args, stage_main


@stage_main
def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="firststage config", description=__doc__)
    add_config_args(parser)
    parser.add_argument("--keys", action="store_true", help="list every config key, its default and its meaning")
    args = parser.parse_args(argv)
    if args.keys:
        for key, default, help_ in describe_fields():
            print(f"{key:<40} {default:<24} {help_}")
        return
    cfg = load_config(args.config, args.overrides)
    print(yaml.safe_dump(config_to_dict(cfg), sort_keys=False), end="")


if __name__ == "__main__":
    main()
