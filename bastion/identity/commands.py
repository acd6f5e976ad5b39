"""``bastion identity ...``: what an administrator registers at the company's identity providers
for bastion's client, read from the ``[identity]`` table of bastion.toml."""

from __future__ import annotations

import argparse
import json
import os
import sys

from bastion.identity.client_key import public_jwks


def client_jwks(args: argparse.Namespace) -> int:
    """Print the public JSON Web Key Set of the ``client_key_file`` of each provider with
    ``private_key_jwt`` (or of the one named): what the provider registers for bastion's client.
    The private halves are never printed."""
    from bastion.identity.providers import IdentitySettings
    from bastion.server.config import ServerConfig

    config = ServerConfig.load(args.config)
    with config.reading("identity"):
        settings = IdentitySettings.from_mapping(config.identity or {}, os.environ).with_keys()
    providers = [p for p in settings.providers if args.provider is None or p.id == args.provider]
    if args.provider is not None and not providers:
        print(f"bastion: no provider {args.provider!r} in [identity]", file=sys.stderr)
        return 2
    keys = [p.client_key for p in providers if p.client_key is not None]
    if not keys:
        print(
            "bastion: no [[identity.providers]] with token_endpoint_auth_method ="
            ' "private_key_jwt"' + (f" named {args.provider!r}" if args.provider else ""),
            file=sys.stderr,
        )
        return 2
    print(json.dumps(public_jwks(keys), indent=2))
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    identity = sub.add_parser("identity", help="bastion's client at the company identity providers")
    commands = identity.add_subparsers(dest="identity_command", required=True)
    p = commands.add_parser(
        "client-jwks",
        help="print the public keys to register at the providers for private_key_jwt",
    )
    p.add_argument("provider", nargs="?", help="only this provider's (its id)")
    p.add_argument("--config", help="bastion.toml (default: ./bastion.toml if present)")
    p.set_defaults(func=client_jwks)
