"""``speechfront``: start any service, the whole local cluster, or a simulated device."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import secrets
import signal
import sys
import time
from pathlib import Path

SERVICES = ("gateway", "vad", "asr", "speaker")
SECRET_ENV = "SF_GATEWAY_AUTH_SECRET"
# The local cluster's ready-made device, for the simulator command in its banner.
DEMO_DEVICE_ID, DEMO_CLIENT_ID = "demo-device", "demo-client"


def _run_service(name: str) -> None:
    if name == "gateway":
        from services.gateway.app import main
    elif name == "vad":
        from services.vad.server import main
    elif name == "asr":
        from services.asr.server import main
    else:
        from services.speaker.server import main
    main()


def _run_cluster(args: argparse.Namespace) -> None:
    import logging

    from services.cluster import ClusterPorts, LocalCluster
    from services.gateway.auth import issue_token

    # Devices present per-device tokens signed with this secret; a given one
    # (or SF_GATEWAY_AUTH_SECRET) keeps tokens issued earlier valid.
    secret = args.secret or os.environ.get(SECRET_ENV) or secrets.token_urlsafe(32)
    token = issue_token(secret, DEMO_CLIENT_ID, DEMO_DEVICE_ID)
    admin = args.admin_token or secrets.token_urlsafe(12)
    extra = {
        SECRET_ENV: secret,
        "SF_GATEWAY_ADMIN_TOKEN": admin,
        "SF_GATEWAY_ALLOW_ANONYMOUS": "true" if args.open else "false",
        # Threshold measured for the lite d-vector model on espeak voices.
        "SF_GATEWAY_SPEAKER_THRESHOLD": "0.86",
    }
    # The offline profile hears Mandarin and English with Whisper base; tiny.en
    # (English only) is the faster choice, made with this one setting.
    whisper = os.environ.get("SF_ASR_WHISPER_MODEL", "base")
    extra["SF_ASR_WHISPER_MODEL"] = whisper
    if args.token:
        # Testing only: one token for every device, identity not verified.
        extra.update(
            {"SF_GATEWAY_AUTH_TOKENS": args.token, "SF_GATEWAY_ALLOW_SHARED_TOKENS": "true"}
        )
    replicas = (
        dict(
            (name, int(count))
            for name, count in (item.split("=") for item in args.replicas.split(","))
        )
        if args.replicas
        else None
    )
    # Restarts and exits are logged here; each process logs to its own file.
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S", stream=sys.stderr
    )
    cluster = LocalCluster(
        Path(args.run_dir),
        ClusterPorts.standard(),
        extra_env=extra,
        host=args.host,
        replicas=replicas,
        supervise=not args.no_restart,
    )
    # Stop the children on SIGTERM as on Ctrl-C.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    print(
        f"starting redis, vad, asr, speaker and gateway (lite profile, Whisper {whisper};"
        " SF_ASR_WHISPER_MODEL=base|tiny.en) ...",
        flush=True,
    )
    if args.backend:
        print("with the example echo backend", flush=True)
    started = time.monotonic()
    cluster.start()
    if args.backend:
        cluster.start_backend()
    p = cluster.ports
    width = max(len(name) for name, _ in cluster.endpoints())
    processes = "\n".join(f"    {name:<{width}}  {where}" for name, where in cluster.endpoints())
    open_note = "   (open mode: any token accepted)" if args.open else ""
    issue_command = (
        f".venv/bin/speechfront issue-token --secret {secret} "
        "--device-id <Device-Id> --client-id <Client-Id>"
    )
    demo = f"Device-Id {DEMO_DEVICE_ID}, Client-Id {DEMO_CLIENT_ID}"
    demo_args = f"--device-id {DEMO_DEVICE_ID} --client-id {DEMO_CLIENT_ID}"
    shared_note = (
        f"\n  shared test token    {args.token}   (any Device-Id: identity not verified)"
        if args.token
        else ""
    )
    restarts = (
        "a process that exits stops everything (--no-restart)"
        if args.no_restart
        else "a process that exits is restarted on its ports (back-off 1 s doubling to 30 s)"
    )
    print(
        f"""
cluster ready in {time.monotonic() - started:.0f} s; logs in {args.run_dir}/

  devices connect to   ws://{args.host}:{p.gateway}/xiaozhi/v1/{open_note}
  token secret         {secret}   ({SECRET_ENV})
  a device's token     {issue_command}
  demo device token    {token}   ({demo}){shared_note}
  speaker admin token  {admin}
  health / metrics     http://{args.host}:{p.gateway}/readyz   http://{args.host}:{p.gateway}/metrics
  processes
{processes}

try a simulated device:
  .venv/bin/speechfront simulate {demo_args} --token {token} --text "turn on the kitchen lights"
  .venv/bin/speechfront simulate {demo_args} --token {token} --wav <recording.wav>

{restarts}; Ctrl-C stops everything.""",
        flush=True,
    )
    try:
        # Supervised, the cluster runs until a signal; otherwise until a process exits.
        while not args.no_restart or all(
            proc.process.poll() is None for proc in cluster.processes.values()
        ):
            time.sleep(1)
        dead = [n for n, proc in cluster.processes.items() if proc.process.poll() is not None]
        print(f"process exited: {', '.join(dead)}; see {args.run_dir}/", file=sys.stderr)
    except KeyboardInterrupt:
        print("\nstopping ...")
    finally:
        # A second signal must not cut the shutdown short and orphan children.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        cluster.stop()
        if cluster.restarts:
            counts = ", ".join(f"{n} {c}" for n, c in cluster.restarts.items() if c)
            print(f"restarts: {counts or 'none'}", flush=True)


def _run_simulator(args: argparse.Namespace) -> None:
    from services.common.audio import read_wav
    from services.simulator.device import DeviceConfig, SimulatedDevice
    from services.simulator.speech import synthesize

    utterances = [synthesize(text, args.voice) for text in args.text]
    utterances += [read_wav(Path(path).read_bytes()) for path in args.wav]
    if not utterances:
        raise SystemExit("give at least one --text or --wav")

    async def run() -> None:
        config = DeviceConfig(
            url=args.url,
            token=args.token,
            protocol_version=args.protocol,
            speed=args.speed,
            hello_extra={"language": args.language} if args.language else {},
            **({"device_id": args.device_id} if args.device_id else {}),
            **({"client_id": args.client_id} if args.client_id is not None else {}),
        )
        async with SimulatedDevice(config) as device:
            print(
                f"connected: session {device.session_id} (protocol v{args.protocol}, {args.mode})"
            )
            if args.mode == "manual":
                results = await device.speak_manual(utterances, timeout=args.timeout)
            else:
                results = await device.speak_auto(utterances, mode=args.mode, timeout=args.timeout)
            for result in results:
                latency = (
                    "" if result.latency_s is None else f"  [{result.latency_s * 1000:.0f} ms]"
                )
                print(json.dumps(result.message, ensure_ascii=False) + latency)

    asyncio.run(run())


def _issue_token(args: argparse.Namespace) -> None:
    from services.gateway.auth import issue_token

    secret = args.secret or os.environ.get(SECRET_ENV, "")
    if not secret:
        raise SystemExit(f"give --secret or set {SECRET_ENV}")
    try:
        print(issue_token(secret, args.client_id, args.device_id))
    except ValueError as exc:
        raise SystemExit(str(exc)) from None


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="speechfront", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    for name in SERVICES:
        sub.add_parser(name, help=f"run the {name} service (configured by SF_{name.upper()}_*)")

    cluster = sub.add_parser("cluster", help="run Redis and every service locally (lite profile)")
    cluster.add_argument("--run-dir", default="run", help="logs and Redis files")
    cluster.add_argument("--host", default="127.0.0.1", help="address services bind")
    cluster.add_argument(
        "--secret", help=f"per-device token secret (default: ${SECRET_ENV} or a random one)"
    )
    cluster.add_argument(
        "--token",
        help="also accept this shared token for any device (testing: identity not verified)",
    )
    cluster.add_argument("--admin-token", help="speaker API token (default: a random one)")
    cluster.add_argument(
        "--backend", action="store_true", help="also run the example echo dialogue backend"
    )
    cluster.add_argument(
        "--replicas",
        help="replicas per service, e.g. gateway=2,vad=2,asr=2,speaker=2 (default 1 each)",
    )
    cluster.add_argument(
        "--open", action="store_true", help="open mode: accept devices without a valid token"
    )
    cluster.add_argument(
        "--no-restart",
        action="store_true",
        help="stop everything when a process exits instead of restarting it",
    )

    sub.add_parser(
        "echo-backend", help="example dialogue backend: echoes transcripts back", add_help=False
    )

    sim = sub.add_parser("simulate", help="stream speech to the gateway as a device would")
    sim.add_argument("--url", default="ws://127.0.0.1:8000/xiaozhi/v1/")
    sim.add_argument("--token")
    sim.add_argument("--device-id")
    sim.add_argument("--client-id", help="Client-Id header (a device token is bound to it)")
    sim.add_argument("--text", action="append", default=[], help="sentence to speak (repeatable)")
    sim.add_argument("--wav", action="append", default=[], help="WAV file to send (repeatable)")
    sim.add_argument("--voice", default="en", help="espeak-ng voice for --text")
    sim.add_argument("--language", help='language to recognise, sent in hello ("zh", "en", "auto")')
    sim.add_argument("--protocol", type=int, choices=(1, 2, 3), default=3)
    sim.add_argument("--mode", choices=("auto", "manual", "realtime"), default="auto")
    sim.add_argument("--speed", type=float, default=1.0, help="1.0 = real time")
    sim.add_argument("--timeout", type=float, default=30.0)

    issue = sub.add_parser(
        "issue-token",
        help="print a device's token (xiaozhi-esp32-server's format: signature.timestamp)",
    )
    issue.add_argument("--secret", help=f"the gateways' token secret (default: ${SECRET_ENV})")
    issue.add_argument("--device-id", required=True, help="the device's Device-Id (its MAC)")
    issue.add_argument("--client-id", required=True, help="the device's Client-Id (a UUID)")

    args, rest = parser.parse_known_args(argv)
    if args.command == "echo-backend":
        from services.backend_example import main as backend_main

        backend_main(rest)
        return
    if rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    if args.command in SERVICES:
        _run_service(args.command)
    elif args.command == "cluster":
        _run_cluster(args)
    elif args.command == "issue-token":
        _issue_token(args)
    else:
        _run_simulator(args)


if __name__ == "__main__":
    main()
