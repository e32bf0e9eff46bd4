"""`apdm ui`: the standalone page, its login and its command line."""

from __future__ import annotations

import logging
from pathlib import Path

from ..config import ProtectConfig
from ..errors import APDMError, InputError
from .app import ProtectApp
from .host import Host
from .layout import build_blocks

log = logging.getLogger(__name__)


def page_host(model: str, images: str, output_dir: str | Path, config: ProtectConfig | None) -> Host:
    """The standalone page: the `quick` preset selected, or, when the page opens on settings
    (`apdm ui --config FILE`, `--demo`), those settings and no preset selected."""
    values = config.to_dict() if config is not None else {}
    config_model, config_images = values.pop("model", ""), values.pop("images", [])
    model, images = model or config_model, images or "; ".join(config_images)
    return Host(
        model=model, images=images, output_dir=output_dir, preset="" if values else "quick", config=values
    )


def launch(
    host: str = "127.0.0.1",
    port: int | None = None,
    model: str = "",
    images: str = "",
    output_dir: str | Path = "apdm_out/models",
    config: ProtectConfig | None = None,
    block: bool = True,
    auth: tuple[str, str] | None = None,
):
    """Serve the app on ``host:port`` (127.0.0.1 by default: this machine only), with Gradio's
    login when ``auth`` = (user, password). When the server stops (Ctrl-C), a running job is
    asked to stop and keeps its resumable state."""
    app = ProtectApp(page_host(model, images, output_dir, config))
    blocks = build_blocks(app)
    blocks.queue()
    try:
        blocks.launch(server_name=host, server_port=port, prevent_thread_lock=not block, auth=auth)
    finally:
        if block:  # the server is gone: do not let a daemon thread die mid-step without its state
            if not app.shutdown():
                log.warning("The running job did not stop in time; its last saved state is kept.")
    return blocks


LOCAL_HOSTS = ("127.0.0.1", "localhost", "::1")


def parse_auth(args) -> tuple[str, str] | None:
    """(user, password) from --auth USER:PASS; a non-local --host needs --auth or an explicit --no-auth."""
    if args.auth:
        user, sep, password = args.auth.partition(":")
        if not sep or not user or not password:
            raise InputError(
                "--auth must be USER:PASSWORD (both non-empty), e.g. --auth alice:correct-horse."
            )
        return user, password
    if args.host not in LOCAL_HOSTS and not args.no_auth:
        raise InputError(
            f"--host {args.host} lets anyone who can reach this machine read and write files through the app: "
            "add --auth USER:PASSWORD (Gradio's login), or --no-auth if the network is yours alone."
        )
    return None


def cmd_ui(args) -> int:
    try:
        import gradio  # noqa: F401
    except ImportError as exc:
        raise APDMError(
            'The app needs gradio: pip install -c constraints.txt "apdm-protect[app]" (or pip install gradio); '
            "A1111/Forge ship it."
        ) from exc
    auth = parse_auth(args)
    if args.host not in LOCAL_HOSTS and auth is None:
        print(
            f"apdm ui: listening on {args.host} without a login (--no-auth): anyone who can reach it can use it."
        )
    config = ProtectConfig.load(args.config) if args.config else None
    if args.demo:  # the demo world's model, subject photos and settings (as `apdm demo`)
        from pathlib import Path

        from ..demo import demo_configs, write_subject_photos

        folder = Path(args.out_dir).parent / "demo"
        config, _, _ = demo_configs(folder, write_subject_photos(folder / "subject"))
        config.output = ""
    launch(args.host, args.port, args.model or "", args.images or "", args.out_dir, config, auth=auth)
    return 0


def register_cli(subparsers) -> None:
    p = subparsers.add_parser(
        "ui", help="Open the APDM app in the browser (Gradio; 127.0.0.1 only by default)."
    )
    p.add_argument(
        "--host",
        default="127.0.0.1",
        help="Interface to listen on (default 127.0.0.1: this machine only; 0.0.0.0 = every interface).",
    )
    p.add_argument("--port", type=int, default=None, help="Port (default: the first free one from 7860).")
    p.add_argument("--auth", default="", metavar="USER:PASS", help="Require this login (Gradio's auth).")
    p.add_argument(
        "--no-auth",
        action="store_true",
        help="Listen on a non-local --host without a login (trusted networks).",
    )
    p.add_argument("--model", default="", help="Model to open on: a diffusers folder or a .safetensors file.")
    p.add_argument("--images", default="", help="Folder of subject images to open on.")
    p.add_argument(
        "--demo",
        action="store_true",
        help="Open on the built-in demo world: its model, the demo subject's photos and the demo settings.",
    )
    p.add_argument(
        "--config", help="Open on the settings of a JSON/YAML file (`apdm config`, --save-config)."
    )
    p.add_argument(
        "--out-dir", default="apdm_out/models", help="Where Save writes (default apdm_out/models)."
    )
    p.set_defaults(func=cmd_ui)
