"""`edge-agent`: run the service, replay a feature CSV, show status, install a model, check sensors, simulate a fleet.

Exit codes: 0 success, 1 a runtime failure, 2 bad configuration or input (the message says
which file and field). Logs go to stderr (``--log-level``); a command's own output to stdout.
"""

from __future__ import annotations

import argparse
import faulthandler
import json
import logging
import signal
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Any

from edge_agent.app import Agent, HardwareFactory, ReplaySettings, StateDirBusy, agent_version
from edge_agent.config import DEFAULT_BUNDLE, DEFAULT_KEY, AgentConfig, ConfigError, load_config, load_device_profile
from edge_agent.sensors.replay import ReplayError
from edge_agent.sensors.simulated import ScenarioError
from edge_agent.service import Service
from edge_agent.simulate import Fleet, FleetSettings
from edge_agent.spool import SpoolError, inspect
from edge_agent.updater.install import install_bundle
from edge_agent.updater.store import UpdateStore
from shared.bundle import BundleError
from shared.topics import TopicError, check_device_id

if TYPE_CHECKING:
    from edge_agent.sensors.hardware import DriverFactories

log = logging.getLogger("edge_agent")


def _install_signals(stop: threading.Event) -> None:
    def handler(signum: int, _frame: FrameType | None) -> None:
        log.info("%s: stopping", signal.Signals(signum).name)
        stop.set()

    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGINT, handler)


def _config(args: argparse.Namespace) -> AgentConfig:
    return load_config(args.config)


def run_service(
    config_path: Path | None,
    *,
    make_hardware: HardwareFactory | None = None,
    environ: dict[str, str] | None = None,
) -> int:
    """Run the agent as a systemd service until SIGTERM/SIGINT; SIGHUP reloads the configuration.

    Tells systemd ``READY=1`` once configuration, profile, model and uplink are up, pings the
    watchdog only while the main loop makes progress, sends ``STATUS=`` lines, ``RELOADING=1``
    around a reload and ``STOPPING=1`` before the clean stop (spool flushed, ``stopped`` published).
    """
    # The watchdog kills a hung agent with SIGABRT: faulthandler writes every thread's stack to the
    # journal first, which shows where the loop hung.
    faulthandler.enable()
    stop = threading.Event()
    reload_requested = threading.Event()
    # Handlers first: a SIGHUP during a slow start must not kill the process (its default action).
    _install_signals(stop)
    signal.signal(signal.SIGHUP, lambda _s, _f: reload_requested.set())
    config = load_config(config_path)
    if config.log_level is not None:
        logging.getLogger().setLevel(config.log_level)
    holder: list[Agent] = []
    service = Service(environ=environ, status=lambda: holder[0].status_line() if holder else "starting")
    agent = Agent(config, stop_event=stop, progress=service.kick, make_hardware=make_hardware)
    holder.append(agent)
    try:
        agent.start()
    except BaseException as exc:
        service.notifier.notify(f"STATUS=failed to start: {exc}"[:400])
        service.close()
        raise
    service.ready()
    try:
        while not stop.wait(0.2):
            if reload_requested.is_set():
                reload_requested.clear()
                service.reloading()
                summary = reload_config(agent, config_path)
                service.reloaded(summary)
    finally:
        service.stopping()
        agent.stop()
        service.close()
    if agent.failed:
        log.error("%s", agent.failed)
        return 1
    return 0


def reload_config(agent: Agent, config_path: Path | None) -> str:
    """Re-read the configuration and apply what can change at run time; a short summary for systemd."""
    log.info("SIGHUP: reloading %s", config_path or "the configuration")
    try:
        new = load_config(config_path)
    except ConfigError as exc:
        # A broken edit must not take a running vehicle down: keep going on the old configuration.
        log.error("reload refused, keeping the running configuration: %s", exc)
        return "reload refused: configuration invalid"
    applied, restart = agent.reload(new)
    summary = f"reloaded ({len(applied)} applied"
    return summary + (f", {len(restart)} need a restart)" if restart else ")")


def cmd_run(args: argparse.Namespace) -> int:
    """`edge-agent run`: the service."""
    return run_service(args.config)


def cmd_replay(args: argparse.Namespace) -> int:
    """`edge-agent replay`: feed a feature CSV through inference, spool and uplink until all is acked."""
    config = _config(args)
    if args.device_id:
        check_device_id(args.device_id)
        config = config.model_copy(update={"device": config.device.model_copy(update={"id": args.device_id})})
    if not (args.rate >= 0):
        raise ConfigError("--rate must be >= 0 (0 = as fast as possible)")
    csv_path = Path(args.csv)
    if not csv_path.is_file():
        raise ConfigError(f"--csv {csv_path}: no such file")
    stop = threading.Event()
    _install_signals(stop)
    agent = Agent(
        config,
        replay=ReplaySettings(csv_path, label_column=args.label_column, rate=args.rate, from_start=args.from_start),
        stop_event=stop,
    )
    agent.start()
    last = 0.0
    try:
        while not stop.wait(0.5):
            now = time.monotonic()
            if now - last >= args.progress_interval:
                last = now
                spool = agent.spool
                uplink = agent.uplink
                assert spool is not None and uplink is not None
                print(
                    f"replay {agent.device_id}: row {agent.counters.replay_rows}, "
                    f"spooled {agent.counters.records}, sent {uplink.counters.records_sent}, "
                    f"acked {uplink.counters.records_released}, waiting {spool.depth()}, "
                    f"bad rows {agent.counters.replay_bad_rows}",
                    flush=True,
                )
    finally:
        agent.stop()
    if agent.failed:
        log.error("%s", agent.failed)
        return 1
    if not agent.finished.is_set():
        print(f"replay {agent.device_id}: interrupted; run again to resume", flush=True)
        return 1
    print(
        f"replay {agent.device_id}: done, {agent.counters.records} records inferred, all acknowledged, "
        f"{agent.counters.replay_bad_rows} bad rows skipped",
        flush=True,
    )
    return 0


def update_document(config: AgentConfig, live: dict[str, Any] | None) -> dict[str, Any]:
    """The update state as persisted (the truth, whether an agent runs or not), with live progress."""
    from shared.update import result_of

    record = UpdateStore(config.state_dir / "update").load(repair=False)
    target = record.target
    ref = target.ref() if target is not None else None
    doc: dict[str, Any] = {
        "state": record.state.value,
        "progress": record.progress,
        "result": result_of(record.state).value,
        "reason": record.reason,
        "error": record.error,
        "target": ref.model_dump() if ref is not None else None,
        "slot": target.slot if target is not None else None,
        "origin": target.origin if target is not None else None,
        "serial": target.serial if target is not None else None,
        "attempt": record.attempt,
        "current": record.active.model_dump() if record.active else None,
        "previous": record.previous.model_dump() if record.previous else None,
        "desired_serial": record.serial if record.serial >= 0 else None,
        "updated_at": record.updated_at or None,
        "history": record.history[-5:],
    }
    if live and live.get("state") == doc["state"]:
        doc["progress"] = live.get("progress", doc["progress"])
        doc["counters"] = live.get("counters")
    return doc


def status_document(config: AgentConfig) -> dict[str, Any]:
    """The status file joined with what the spool and the update state say."""
    doc: dict[str, Any] = {"device_id": config.device.id, "state": "unknown"}
    try:
        doc.update(json.loads(config.status_path.read_text()))
        doc["status_file"] = str(config.status_path)
        doc["status_age_s"] = round(time.time() - float(doc.get("updated_at", 0)), 1)
    except FileNotFoundError:
        doc["status_file"] = None
    except (OSError, ValueError) as exc:
        doc["status_file_error"] = str(exc)
    try:
        spool = inspect(config.spool_path)
        doc["spool"] = spool
        doc["spool_epoch"] = spool["epoch"]
        doc["spool_depth"] = spool["depth"]
        doc["spool_bytes"] = spool["bytes"]
    except SpoolError as exc:
        doc["spool"] = None
        doc["spool_error"] = str(exc)
    doc["update"] = update_document(config, doc.get("update") if doc.get("state") == "running" else None)
    return doc


def cmd_status(args: argparse.Namespace) -> int:
    """`edge-agent status`: device, epoch, spool depth and bytes, last ack, model."""
    doc = status_document(_config(args))
    if args.json:
        print(json.dumps(doc, indent=2, default=str))
        return 0
    model = doc.get("model") or {}
    last_ack = doc.get("last_ack_at")
    lines = [
        f"device:       {doc.get('device_id')}",
        f"state:        {doc.get('state')}"
        + (f" (status {doc['status_age_s']} s old)" if "status_age_s" in doc else ""),
        f"model:        {model.get('name', '-')} {model.get('version', '')}".rstrip(),
        f"spool epoch:  {doc.get('spool_epoch', '-')}",
        f"spool depth:  {doc.get('spool_depth', '-')} records, {doc.get('spool_bytes', '-')} bytes",
        f"last ack:     {time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(last_ack)) if last_ack else '-'}",
        f"inference:    {doc.get('inference_rate', '-')} /s",
        f"profile:      {doc.get('profile', '-')}",
    ]
    sensors = doc.get("sensors") or {}
    if sensors:
        lines.append(
            "sensors:      "
            + ", ".join(
                f"{name} {h.get('state')}" + (f" ({h['reason']})" if h.get("reason") else "")
                for name, h in sorted(sensors.items())
            )
        )
    if doc.get("spool") and doc["spool"]["gaps"]:
        lines.append(f"open gaps:    {doc['spool']['gaps']}")
    lines.extend(_update_lines(doc["update"]))
    if doc.get("spool_error"):
        lines.append(f"spool:        {doc['spool_error']}")
    print("\n".join(lines))
    return 0


def _model_name(ref: dict[str, Any] | None, fallback: str = "-") -> str:
    if not ref:
        return fallback
    sha = ref.get("sha256")
    return f"{ref.get('name')} {ref.get('version')}" + (f" ({sha[:12]})" if sha else "")


def _update_lines(update: dict[str, Any]) -> list[str]:
    lines = [
        f"update:       {update['state']} (result {update['result']}"
        + (f", progress {update['progress']:.0%}" if update["progress"] else "")
        + ")",
    ]
    if update.get("target"):
        lines.append(f"  target:     {_model_name(update['target'])} [{update['slot']}, {update['origin']}]")
    if update.get("reason") or update.get("error"):
        lines.append(f"  error:      {update.get('reason')}: {update.get('error')}")
    lines.append(f"  current:    {_model_name(update.get('current'), 'the configured bundle')}")
    if update.get("previous"):
        lines.append(f"  previous:   {_model_name(update['previous'])}")
    return lines


def cmd_model_install(args: argparse.Namespace) -> int:
    """`edge-agent model install`: a local bundle through the update state machine; 0 only on committed."""
    config = _config(args)
    bundle = Path(args.bundle)
    if not bundle.exists():
        raise ConfigError(f"BUNDLE {bundle}: no such file or folder")
    timeout = args.timeout if args.timeout is not None else config.updates.install_timeout_s
    last: list[str] = [""]

    def waiting(info: dict[str, Any]) -> None:
        line = f"waiting for the agent: {'claimed' if info['claimed'] else 'queued'}, update state {info['state']}"
        if line != last[0] and not args.json:
            print(line, flush=True)
            last[0] = line

    result = install_bundle(config, bundle, agent_version=agent_version(), timeout=timeout, waiting=waiting)
    if args.json:
        print(json.dumps(result, indent=2, default=str))
    else:
        model = result.get("model") or {}
        what = f"{model.get('name')} {model.get('version')}" if model else str(bundle)
        if result.get("state") == "committed":
            print(f"installed {what}: committed" + (f" ({result['detail']})" if result.get("detail") else ""))
        else:
            outcome = f"{result.get('state')}, {result.get('reason')}: {result.get('error')}"
            print(f"install of {what} did not commit: {outcome}")
    return 0 if result.get("state") == "committed" else 1


def sensors_check(config: AgentConfig, *, as_json: bool = False, factories: DriverFactories | None = None) -> int:
    """Read each sensor of the configured profile once and print what was found; 0 if all are ok, else 1."""
    from edge_agent.sensors.hardware import check_sensors

    profile = load_device_profile(config)
    reports = check_sensors(profile, factories)
    all_ok = all(r.ok for r in reports)
    if as_json:
        doc = {
            "profile": profile.name,
            "ok": all_ok,
            "sensors": [
                {
                    "sensor": r.sensor,
                    "device": r.device,
                    "state": r.state,
                    "reason": r.reason,
                    "detail": r.detail,
                    "values": r.values,
                    **r.info,
                }
                for r in reports
            ],
        }
        print(json.dumps(doc, indent=2, default=str))
    else:
        print(f"profile {profile.name}: {profile.description}".rstrip(": "))
        for r in reports:
            print(f"{r.sensor:<11} {r.state.upper():<9} {r.device}")
            if r.values:
                print("            " + ", ".join(f"{k}={v:g}" for k, v in r.values.items()))
            if r.reason:
                print(f"            {r.reason}: {r.detail}")
        print("all sensors ok" if all_ok else "some sensors are not ok")
    return 0 if all_ok else 1


def cmd_sensors_check(args: argparse.Namespace) -> int:
    """`edge-agent sensors check`: read each sensor once, for bring-up."""
    return sensors_check(_config(args), as_json=args.json)


def _updates_option(text: str | None) -> dict[str, Any]:
    if not text:
        return {}
    import yaml

    try:
        doc = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"--updates: not YAML: {exc}") from None
    if not isinstance(doc, dict):
        raise ConfigError("--updates must be a mapping, e.g. '{watch_s: 5, shadow_s: 0}'")
    return doc


def cmd_simulate(args: argparse.Namespace) -> int:
    """`edge-agent simulate`: N simulated vehicles in this process."""
    state_dir = Path(args.state_dir) if args.state_dir else Path(tempfile.mkdtemp(prefix="edge-simulate-"))
    settings = FleetSettings(
        devices=args.devices,
        collector=args.collector,
        state_dir=state_dir,
        scenario=Path(args.scenario) if args.scenario else None,
        rate_hz=args.rate,
        id_prefix=args.id_prefix,
        late_labels=Path(args.late_labels) if args.late_labels else None,
        late_label_fraction=args.late_label_fraction,
        duration=args.duration,
        bundle=Path(args.bundle) if args.bundle else DEFAULT_BUNDLE,
        trusted_keys=[Path(k) for k in args.trusted_key] if args.trusted_key else [DEFAULT_KEY],
        seed=args.seed,
        protocol=args.protocol,
        updates=_updates_option(args.updates),
    )
    try:
        check_device_id(f"{settings.id_prefix}001")
    except TopicError as exc:
        raise ConfigError(f"--id-prefix: {exc}") from None
    stop = threading.Event()
    _install_signals(stop)
    try:
        fleet = Fleet(settings, stop_event=stop)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    log.info("simulated fleet state in %s", state_dir)
    return fleet.run()


def build_parser() -> argparse.ArgumentParser:
    """The `edge-agent` argument parser."""
    parser = argparse.ArgumentParser(prog="edge-agent", description="Vehicle-side agent of fleet-model-health.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {agent_version()}")
    parser.add_argument(
        "--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"], help="stderr log level"
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    run = sub.add_parser("run", help="run the agent service")
    run.add_argument("--config", type=Path, help="agent YAML (see edge_agent/agent.example.yaml)")
    run.set_defaults(func=cmd_run)

    replay = sub.add_parser("replay", help="replay a feature CSV through inference, spool and uplink")
    replay.add_argument("--config", type=Path, help="agent YAML")
    replay.add_argument("--csv", required=True, help="CSV with one column per model feature")
    replay.add_argument("--label-column", help="column holding the ground-truth label")
    replay.add_argument("--rate", type=float, default=0.0, help="records per second (0 = as fast as possible)")
    replay.add_argument("--device-id", help="override device.id")
    replay.add_argument("--from-start", action="store_true", help="ignore the saved cursor and start at row 0")
    replay.add_argument("--progress-interval", type=float, default=5.0, help="seconds between progress lines")
    replay.set_defaults(func=cmd_replay)

    status = sub.add_parser("status", help="show device, spool and uplink state")
    status.add_argument("--config", type=Path, help="agent YAML")
    status.add_argument("--json", action="store_true", help="machine-readable output")
    status.set_defaults(func=cmd_status)

    model = sub.add_parser("model", help="model management on this device")
    model_sub = model.add_subparsers(dest="model_command", required=True, metavar="SUBCOMMAND")
    install = model_sub.add_parser(
        "install", help="install a bundle through the update state machine; exits 0 only once committed"
    )
    install.add_argument("bundle", metavar="BUNDLE", help="bundle .tar or folder")
    install.add_argument("--config", type=Path, help="agent YAML")
    install.add_argument("--timeout", type=float, help="seconds to wait for a running agent")
    install.add_argument("--json", action="store_true", help="machine-readable outcome")
    install.set_defaults(func=cmd_model_install)

    sensors = sub.add_parser("sensors", help="sensor bring-up tools")
    sensors_sub = sensors.add_subparsers(dest="sensors_command", required=True, metavar="SUBCOMMAND")
    check = sensors_sub.add_parser("check", help="read each sensor of the profile once and print what was found")
    check.add_argument("--config", type=Path, help="agent YAML (device.profile names the hardware)")
    check.add_argument("--json", action="store_true", help="machine-readable output")
    check.set_defaults(func=cmd_sensors_check)

    sim = sub.add_parser("simulate", help="run N simulated vehicles in one process")
    sim.add_argument("--devices", type=int, required=True, help="number of vehicles")
    sim.add_argument("--collector", required=True, help="broker URL, mqtt://host:port")
    sim.add_argument("--scenario", help="scenario YAML or built-in name (default: training)")
    sim.add_argument("--rate", type=float, default=10.0, help="inferences per second per vehicle")
    sim.add_argument("--state-dir", help="folder for the vehicles' spools (default: a new temporary folder)")
    sim.add_argument("--id-prefix", default="sim-", help="device ids are <prefix>NNN")
    sim.add_argument("--late-labels", help="append late labels to this CSV")
    sim.add_argument("--late-label-fraction", type=float, default=0.2, help="fraction of records labelled late")
    sim.add_argument("--duration", type=float, help="seconds to run (default: until SIGTERM)")
    sim.add_argument("--bundle", help="model bundle (default: the packaged reference)")
    sim.add_argument("--trusted-key", action="append", help="pinned public key file (repeatable)")
    sim.add_argument("--seed", type=int, default=0, help="base random seed (vehicle i uses seed + i)")
    sim.add_argument("--protocol", choices=["3.1.1", "5"], default="3.1.1", help="MQTT protocol version")
    sim.add_argument("--updates", help="YAML mapping for every vehicle's `updates` section, e.g. '{watch_s: 5}'")
    sim.set_defaults(func=cmd_simulate)

    try:
        from edge_agent import dataset
    except ImportError as exc:  # the dataset command needs the simulator; the agent does not
        log.debug("dataset command unavailable: %s", exc)
    else:
        dataset.register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `edge-agent` console script."""
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=getattr(logging, args.log_level),
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(threadName)s %(name)s: %(message)s",
    )
    try:
        return int(args.func(args))
    except (ConfigError, TopicError) as exc:
        log.error("configuration: %s", exc)
        return 2
    except (ReplayError, ScenarioError) as exc:
        log.error("input: %s", exc)
        return 2
    except BundleError as exc:
        log.error("model bundle refused (%s): %s", exc.reason, exc.detail)
        return 2
    except SpoolError as exc:
        log.error("spool: %s", exc)
        return 1
    except StateDirBusy as exc:
        log.error("state directory busy: %s", exc)
        return 1
    except KeyboardInterrupt:
        return 130
