"""Nothing lost, nothing falsely passed. Each probe of the issue, the way it breaks:

- kill -9, SIGTERM and SIGINT of a real `python -m expand depth` / `widen` in the middle of its write (a
  ~280 MB checkpoint, so the write takes about a second): no partial output, and the next run succeeds
  and leaves no temporary behind; a forced replacement killed mid-write keeps the old output;
- two real writers racing to one new output: exactly one exits 0, the other 2;
- damaged files (safetensors headers, the index, config.json, GGUF, orbax): exit 2 naming the file, the
  input's sha256 unchanged; the safetensors library refuses the same safetensors files;
- outputs that are, lie inside or contain an input (as written and through symlinks) for every verb that
  writes, with and without --force: exit 2, every input's sha256 unchanged;
- a full disk (a small tmpfs in a private mount namespace): exit 2 naming the output and the bytes needed.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from safetensors import safe_open

import expand
from expand.cli import main
from expand.io import atomic
from expand.surgery.grow import widen_to_disk
from tests.helpers import make_hf_checkpoint

ROOT = Path(__file__).resolve().parents[1]
DEPTH_12 = ["--layer-spec", "0:4,0:4,0:4"]
WIDEN_960 = ["--hidden-size", "960", "--num-heads", "15", "--num-kv-heads", "5", "--intermediate-size", "2560",
             "--fill", "zeros"]


@pytest.fixture(scope="module")
def big(tmp_path_factory) -> Path:
    """A random Llama of 73 M parameters (284 MB in fp32): depth to 12 layers writes 476 MB."""
    return make_hf_checkpoint(tmp_path_factory.mktemp("big") / "model", vocab_size=32000, hidden_size=768,
                              intermediate_size=2048, num_attention_heads=12, num_key_value_heads=4)


def hashes(*roots: Path) -> dict[str, str]:
    """sha256 of every file under `roots` (a symlink counts as its target's name, not followed)."""
    found = {}
    for root in roots:
        for path in [root] if not root.is_dir() or root.is_symlink() else sorted(root.rglob("*")):
            if path.is_symlink():
                found[str(path)] = "-> " + os.readlink(path)
            elif path.is_file():
                found[str(path)] = hashlib.sha256(path.read_bytes()).hexdigest()
    return found


def leftovers(out: Path) -> list[str]:
    """Temporaries, set-aside outputs and lock files of `out` in its folder."""
    return sorted(n for n in os.listdir(out.parent) if n.startswith(f".{out.name}."))


def expand_cli(*args, **kwargs) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "expand", *map(str, args)], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, **kwargs)


def run_cli(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "expand", *map(str, args)], cwd=ROOT, capture_output=True,
                          text=True)


def wait_until_writing(process: subprocess.Popen, out: Path) -> Path:
    """Poll until `process` has put weight bytes into a new temporary beside `out`; return that folder."""
    before = set(leftovers(out))
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        for name in set(leftovers(out)) - before:
            if ".tmp-" in name and any(f.stat().st_size > 0 for f in (out.parent / name).glob("*.safetensors")):
                return out.parent / name
        assert process.poll() is None, f"the run ended before its write was caught: {process.communicate()}"
        time.sleep(0.005)
    raise AssertionError("no temporary appeared")


def assert_whole_output(out: Path, layers: int, hidden: int) -> None:
    """The safetensors library opens every shard (its header checks pass) and the config says what was asked."""
    config = expand.read_config(out)
    assert (config.num_hidden_layers, config.hidden_size) == (layers, hidden)
    names = set()
    for shard in out.glob("*.safetensors"):
        with safe_open(shard, "np") as f:
            names |= set(f.keys())
    assert f"model.layers.{layers - 1}.mlp.down_proj.weight" in names


# ---- kill -9, SIGTERM, SIGINT mid-write ----------------------------------------------------------------


@pytest.mark.parametrize("verb, options, layers, hidden", [("depth", DEPTH_12, 12, 768),
                                                           ("widen", WIDEN_960, 4, 960)])
def test_kill_9_mid_write_leaves_no_output_and_the_next_run_cleans_up(tmp_path, big, verb, options, layers, hidden):
    out = tmp_path / "out"
    process = expand_cli(verb, big, out, *options)
    wait_until_writing(process, out)
    process.kill()
    process.communicate()
    assert not out.exists()
    assert any(".tmp-" in n for n in leftovers(out))  # what a dead run leaves: the next run must remove it
    rerun = run_cli(verb, big, out, *options)
    assert rerun.returncode == 0, rerun.stderr
    assert_whole_output(out, layers, hidden)
    assert leftovers(out) == []


@pytest.mark.parametrize("sig, status", [(signal.SIGTERM, 143), (signal.SIGINT, 130)], ids=["SIGTERM", "SIGINT"])
def test_sigterm_and_sigint_mid_write_remove_the_temporary(tmp_path, big, sig, status):
    out = tmp_path / "out"
    process = expand_cli("depth", big, out, *DEPTH_12)
    wait_until_writing(process, out)
    process.send_signal(sig)
    _, err = process.communicate()
    assert process.returncode == status, err
    assert not out.exists() and leftovers(out) == []


def test_kill_9_during_a_forced_replacement_keeps_the_old_output(tmp_path, big):
    out = tmp_path / "out"
    assert run_cli("depth", big, out, "--layer-spec", "0:2").returncode == 0
    old = hashes(out)
    process = expand_cli("depth", big, out, *DEPTH_12, "--force")
    wait_until_writing(process, out)
    process.kill()
    process.communicate()
    assert hashes(out) == old
    rerun = run_cli("depth", big, out, *DEPTH_12, "--force")
    assert rerun.returncode == 0, rerun.stderr
    assert_whole_output(out, 12, 768)
    assert leftovers(out) == []


def test_a_replacement_killed_between_its_renames_is_put_back_by_the_next_run(tmp_path, tiny_checkpoint, capsys):
    """Where renameat2(RENAME_EXCHANGE) is missing, a replacement renames the old output aside, then the new
    one into place; a kill between the two leaves exactly this: no output, `.out.old-*` and a temporary."""
    out = tmp_path / "out"
    assert main(["depth", str(tiny_checkpoint), str(out), "--layer-spec", "0:2"]) == 0
    old = {k.replace(str(out), "OUT"): v for k, v in hashes(out).items()}
    out.rename(tmp_path / ".out.old-0badf00d")
    shutil.copytree(tiny_checkpoint, tmp_path / ".out.tmp-0badcafe")
    assert main(["depth", str(tiny_checkpoint), str(out), "--layer-spec", "0:3"]) == 2  # restored, so it exists
    assert "restored" in capsys.readouterr().err
    assert {k.replace(str(out), "OUT"): v for k, v in hashes(out).items()} == old
    assert leftovers(out) == []


def test_a_forced_replacement_without_renameat2_still_replaces_whole(tmp_path, tiny_checkpoint, monkeypatch):
    out = tmp_path / "out"
    assert main(["depth", str(tiny_checkpoint), str(out), "--layer-spec", "0:2"]) == 0
    monkeypatch.setattr(atomic, "_RENAMEAT2", None)
    assert main(["depth", str(tiny_checkpoint), str(out), "--layer-spec", "0:3", "--force"]) == 0
    assert expand.read_config(out).num_hidden_layers == 3 and leftovers(out) == []


# ---- one writer per output -------------------------------------------------------------------------------


def test_two_runs_racing_to_one_new_output_exactly_one_writes(tmp_path, big):
    out = tmp_path / "out"
    racers = [expand_cli("depth", big, out, *DEPTH_12) for _ in range(2)]
    results = sorted((p.returncode, stdout, stderr) for p in racers for stdout, stderr in [p.communicate()])
    (won, won_out, _), (lost, _, lost_err) = results
    assert (won, lost) == (0, 2), results
    assert f"wrote {out}" in won_out
    assert str(out) in lost_err and ("another run" in lost_err or "already exists" in lost_err)
    assert_whole_output(out, 12, 768)
    assert leftovers(out) == []


def test_a_live_runs_temporary_is_left_alone(tmp_path, big):
    out = tmp_path / "out"
    process = expand_cli("depth", big, out, *DEPTH_12)
    temporary = wait_until_writing(process, out)
    with pytest.raises(atomic.OutputExistsError, match=f"another run \\(pid {process.pid}\\) is writing"):
        atomic.claim_output(out, overwrite=True)
    assert temporary.is_dir()
    _, err = process.communicate()
    assert process.returncode == 0, err
    assert_whole_output(out, 12, 768)
    assert leftovers(out) == []


def test_every_file_and_folder_is_fsynced_before_the_rename_and_the_parent_after(tmp_path, tiny_checkpoint,
                                                                               monkeypatch):
    synced = []
    real_fsync = os.fsync

    def recording_fsync(fd):
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", recording_fsync)
    out = expand.save(tmp_path / "out", *expand.load(tiny_checkpoint), tokenizer_from=None)
    assert synced[-1] == os.path.realpath(tmp_path)  # the parent, after the rename
    temporary = Path(synced[-2])
    assert str(temporary.parent) == synced[-1] and temporary.name.startswith(".out.tmp-")
    assert {Path(p).name for p in synced[:-2] if Path(p).parent == temporary} == {p.name for p in out.iterdir()}


# ---- damaged inputs ----------------------------------------------------------------------------------------

K0, K1 = "model.layers.0.self_attn.k_proj.weight", "model.layers.1.self_attn.k_proj.weight"


def rewrite_header(path: Path, change) -> Path:
    raw = path.read_bytes()
    (length,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + length])
    change(header)
    new = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(new)) + new + raw[8 + length:])
    return path


def truncated(d):
    f = d / "model.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size * 3 // 5])
    return f


def dtype_not_matching_bytes(d):
    return rewrite_header(d / "model.safetensors", lambda h: h[K0].update(dtype="F16"))


def overlapping_offsets(d):
    return rewrite_header(d / "model.safetensors", lambda h: h[K1].update(data_offsets=h[K0]["data_offsets"]))


def offsets_end_before_begin(d):
    return rewrite_header(d / "model.safetensors", lambda h: h[K0].update(data_offsets=h[K0]["data_offsets"][::-1]))


def header_not_json(d):
    f = d / "model.safetensors"
    raw = bytearray(f.read_bytes())
    raw[8] = ord("x")  # the header's opening brace
    f.write_bytes(bytes(raw))
    return f


def missing_data_offsets(d):
    return rewrite_header(d / "model.safetensors", lambda h: h[K0].pop("data_offsets"))


def unknown_dtype(d):
    return rewrite_header(d / "model.safetensors", lambda h: h[K0].update(dtype="F33"))


def bytes_after_the_last_tensor(d):
    f = d / "model.safetensors"
    f.write_bytes(f.read_bytes() + bytes(16))
    return f


def index_not_json(d):
    index = d / "model.safetensors.index.json"
    index.write_text(index.read_text()[:-10])
    return index


def index_without_weight_map(d):
    index = d / "model.safetensors.index.json"
    index.write_text(json.dumps({"metadata": json.loads(index.read_text())["metadata"]}))
    return index


def config_missing_a_field(d):
    config = json.loads((d / "config.json").read_text())
    del config["num_attention_heads"]
    (d / "config.json").write_text(json.dumps(config))
    return d / "config.json"


def config_not_json(d):
    text = (d / "config.json").read_text()
    (d / "config.json").write_text(text[: len(text) // 2])
    return d / "config.json"


SAFETENSORS_DAMAGE = [truncated, dtype_not_matching_bytes, overlapping_offsets, offsets_end_before_begin,
                      header_not_json, missing_data_offsets, unknown_dtype, bytes_after_the_last_tensor]
DAMAGE = SAFETENSORS_DAMAGE + [index_not_json, index_without_weight_map, config_missing_a_field, config_not_json]


@pytest.fixture(scope="module")
def sharded(tmp_path_factory) -> Path:
    path = make_hf_checkpoint(tmp_path_factory.mktemp("sharded") / "model", max_shard_size="300KB")
    assert (path / "model.safetensors.index.json").exists()
    return path


def library_reads(path: Path) -> None:
    with safe_open(path, "np") as f:
        for name in f.keys():
            f.get_tensor(name)


@pytest.mark.parametrize("verb", ["depth", "convert"])
@pytest.mark.parametrize("damage", DAMAGE, ids=lambda f: f.__name__)
def test_damaged_checkpoints_are_exit_2_naming_the_file(tmp_path, tiny_checkpoint, sharded, capsys, damage, verb):
    indexed = damage in (index_not_json, index_without_weight_map)
    broken = shutil.copytree(sharded if indexed else tiny_checkpoint, tmp_path / "in")
    named = damage(broken)
    if damage in SAFETENSORS_DAMAGE:
        with pytest.raises(Exception):  # the safetensors library refuses the same file
            library_reads(named)
    before = hashes(broken)
    out = tmp_path / "out"
    options = ["--layer-spec", "0:2"] if verb == "depth" else []
    assert main([verb, str(broken), str(out), *options]) == 2
    err = capsys.readouterr().err
    assert str(named) in err, err
    if damage is config_missing_a_field:
        assert "num_attention_heads" in err
    assert hashes(broken) == before
    assert not out.exists() and leftovers(out) == []


def test_the_order_of_header_entries_does_not_matter(tmp_path, tiny_checkpoint):
    """The library sorts tensors by offset, so a header listed in another order is valid, here as there."""
    model = shutil.copytree(tiny_checkpoint, tmp_path / "in")
    rewrite_header(model / "model.safetensors", lambda h: [h.update({k: h.pop(k)}) for k in sorted(h, reverse=True)])
    library_reads(model / "model.safetensors")
    again, original = expand.load(model), expand.load(tiny_checkpoint)
    for name in original.params:
        np.testing.assert_array_equal(np.asarray(again.params[name]), np.asarray(original.params[name]))


def test_a_damaged_gguf_is_exit_2_naming_the_file_and_the_fix(tmp_path, capsys):
    import gguf

    truncated_gguf = tmp_path / "half.gguf"
    data = expand.io.resolve("smollm2").read_bytes()
    truncated_gguf.write_bytes(data[: len(data) // 2])
    writer = gguf.GGUFWriter(str(tmp_path / "bare.gguf"), "llama")  # no sizes in its metadata
    writer.add_block_count(2)
    writer.add_tensor("token_embd.weight", np.zeros((16, 4), np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    for broken in (truncated_gguf, tmp_path / "bare.gguf"):
        before = hashes(broken)
        assert main(["convert", str(broken), str(tmp_path / "out")]) == 2
        err = capsys.readouterr().err
        assert str(broken) in err and "re-download" in err, err
        assert hashes(broken) == before and not (tmp_path / "out").exists()


def test_a_damaged_orbax_checkpoint_is_exit_2_naming_it_and_the_fix(tmp_path, tiny_checkpoint, capsys):
    orbax = tmp_path / "orbax"
    assert main(["convert", str(tiny_checkpoint), str(orbax), "--format", "orbax"]) == 0
    largest = max((p for p in (orbax / "params").rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)
    largest.write_bytes(largest.read_bytes()[: largest.stat().st_size // 2])
    before = hashes(orbax)
    assert main(["convert", str(orbax), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert f"{orbax} is not a readable orbax checkpoint" in err and "--format orbax" in err, err
    assert hashes(orbax) == before and not (tmp_path / "out").exists()


# ---- inputs are sacred -------------------------------------------------------------------------------------

SMALL = ["--random-tokens", "--seq-len", "16", "--num-sequences", "2"]


@pytest.fixture(scope="module")
def wide(tmp_path_factory) -> Path:
    """A donor for widening the tiny model to hidden 96."""
    return make_hf_checkpoint(tmp_path_factory.mktemp("wide") / "model", seed=5, hidden_size=96,
                              num_attention_heads=12, num_key_value_heads=3, intermediate_size=240)


def verbs(models: Path, cache: Path) -> dict:
    """verb -> (argv with OUT for the output, the input that the output is made to overlap)."""
    base, twin, wide = models / "base", models / "twin", models / "wide"
    widen = ["--hidden-size", "96", "--num-heads", "12", "--num-kv-heads", "3", "--intermediate-size", "240"]
    recipe = models.parent / "recipe.yaml"
    return {
        "convert": (["convert", base, "OUT"], base),
        "depth": (["depth", base, "OUT", "--layer-spec", "0:2"], base),
        "depth-recipe-model": (["depth", base, "OUT", "--recipe", recipe], twin),
        "widen": (["widen", base, "OUT", *widen], base),
        "widen-donor": (["widen", base, "OUT", *widen, "--donor", wide], wide),
        "heal": (["heal", base, "OUT", "--steps", "1", *SMALL], base),
        "heal-teacher": (["heal", base, "OUT", "--teacher", twin, "--steps", "1", *SMALL], twin),
        "ablate": (["ablate", base, "--sweep", "delete-one", *SMALL, "--out", "OUT"], base),
        "ablate-text": (["ablate", base, "--sweep", "delete-one", "--text", models / "text.txt", "--out", "OUT"],
                        models / "text.txt"),
        "demo": (["demo", "--out", "OUT"], cache / "smollm2"),
    }


RELATIONS = {
    "is": lambda target, link: target,
    "inside": lambda target, link: target / "sub",
    "contains": lambda target, link: target.parent,
    "symlink-is": lambda target, link: link,
    "symlink-inside": lambda target, link: link / "sub",
    "symlink-contains": lambda target, link: link / "..",
}


@pytest.mark.parametrize("force", [False, True], ids=["", "force"])
@pytest.mark.parametrize("relation", RELATIONS)
@pytest.mark.parametrize("verb", list(verbs(Path("m"), Path("c"))))
def test_an_output_overlapping_an_input_is_refused(tmp_path, tiny_checkpoint, wide, monkeypatch, capsys, verb,
                                                   relation, force):
    models = tmp_path / "models"
    for name, source in (("base", tiny_checkpoint), ("twin", tiny_checkpoint), ("wide", wide)):
        shutil.copytree(source, models / name)
    (models / "text.txt").write_text("the text an evaluation reads\n" * 100)
    (tmp_path / "recipe.yaml").write_text(json.dumps({"merge_method": "passthrough", "slices": [
        {"sources": [{"model": str(models / "base"), "layer_range": [0, 2]}]},
        {"sources": [{"model": str(models / "twin"), "layer_range": [1, 3]}]}]}))
    cache = tmp_path / "cache"
    (cache / "smollm2").mkdir(parents=True)
    real_gguf = expand.io.resolve("smollm2")
    (cache / "smollm2" / real_gguf.name).symlink_to(real_gguf)
    monkeypatch.setenv("EXPAND_CACHE", str(cache))
    argv, target = verbs(models, cache)[verb]
    (tmp_path / "link").symlink_to(target)
    out = RELATIONS[relation](target, tmp_path / "link")
    before = hashes(models, tmp_path / "recipe.yaml", cache)
    existed = out.exists()
    argv = [str(out) if a == "OUT" else str(a) for a in argv] + (["--force"] if force else [])
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "would overwrite the input" in err, err
    assert hashes(models, tmp_path / "recipe.yaml", cache) == before
    assert out.exists() == existed
    assert not [p for p in tmp_path.rglob(".*") if ".lock" in p.name or ".tmp-" in p.name]


def test_a_two_model_recipe_reads_both_models_through_the_command_line(tmp_path, tiny_checkpoint):
    twin = make_hf_checkpoint(tmp_path / "twin", seed=7)
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(json.dumps({"merge_method": "passthrough", "slices": [
        {"sources": [{"model": str(tiny_checkpoint), "layer_range": [0, 3]}]},
        {"sources": [{"model": str(twin), "layer_range": [1, 4]}]}]}))
    assert main(["depth", str(tiny_checkpoint), str(tmp_path / "out"), "--recipe", str(recipe)]) == 0
    merged, second = expand.load(tmp_path / "out"), expand.load(twin)
    np.testing.assert_array_equal(merged.params["lm_head.weight"], second.params["lm_head.weight"])
    np.testing.assert_array_equal(merged.params["layers.mlp.up_proj.weight"][5],
                                  second.params["layers.mlp.up_proj.weight"][3])


def test_heal_refuses_checkpoints_that_would_overwrite_an_input(tmp_path, tiny_checkpoint, capsys):
    model = shutil.copytree(tiny_checkpoint, tmp_path / "run.checkpoints")
    before = hashes(model)
    assert main(["heal", str(model), str(tmp_path / "run"), "--steps", "1", *SMALL, "--force"]) == 2
    assert f"output {model} is the input" in capsys.readouterr().err
    assert hashes(model) == before


def test_check_refuses_reports_that_would_overwrite_an_input(tmp_path, tiny_checkpoint, capsys):
    base = shutil.copytree(tiny_checkpoint, tmp_path / "base")
    text = tmp_path / "text.txt"
    text.write_text("the text an evaluation reads\n" * 100)
    before = hashes(base, text)
    for option, path in (("--json", base / "config.json"), ("--plot", base / "drift.png"), ("--json", text)):
        assert main(["check", str(base), "--layer-spec", "0:4", "--text", str(text), option, str(path)]) == 2
        assert "would overwrite the input" in capsys.readouterr().err
    assert hashes(base, text) == before and not (base / "drift.png").exists()


def test_library_writers_refuse_to_overwrite_their_inputs(tmp_path, tiny_checkpoint, wide):
    base = shutil.copytree(tiny_checkpoint, tmp_path / "models" / "base")
    donor = shutil.copytree(wide, tmp_path / "models" / "wide")
    before = hashes(tmp_path / "models")
    model = expand.load(base)
    plan = expand.plan_from_layer_spec("0:2", 4)
    writers = [
        lambda: expand.save(base, *model, tokenizer_from=model, overwrite=True),
        lambda: expand.save(tmp_path / "models", *model, tokenizer_from=base, overwrite=True),
        lambda: expand.depth_to_disk(base, base / "sub", plan, overwrite=True),
        lambda: widen_to_disk(base, donor, donor=donor, hidden_size=96, num_attention_heads=12,
                                     num_key_value_heads=3, intermediate_size=240, overwrite=True),
    ]
    for write in writers:
        with pytest.raises(ValueError, match="would overwrite the input"):
            write()
    with pytest.raises(ValueError, match="would overwrite the input"):
        with atomic.atomic_dir(tmp_path / "models", overwrite=True, inputs=[base]):
            pass
    assert hashes(tmp_path / "models") == before
    assert sorted(os.listdir(tmp_path)) == ["models"]


# ---- a full disk -------------------------------------------------------------------------------------------


def run_on_small_disk(mount: Path, size: str, *args) -> subprocess.CompletedProcess:
    """`python -m expand ARGS` with `mount` a tmpfs of `size` in a private mount namespace; its stdout ends
    with what is left on that tmpfs afterwards."""
    script = (f'mount -t tmpfs -o size={size} none "{mount}" || exit 99; '
              f'"{sys.executable}" -m expand "$@"; status=$?; ls -A "{mount}"; exit $status')
    return subprocess.run(["unshare", "--user", "--map-root-user", "--mount", "sh", "-c", script, "sh",
                           *map(str, args)], cwd=ROOT, capture_output=True, text=True)


@pytest.mark.parametrize("write", [["depth", "--layer-spec", "0:4,0:4"], ["convert", "--format", "orbax"]],
                         ids=["depth-safetensors", "convert-orbax"])
def test_a_full_disk_is_exit_2_naming_the_output_and_the_space_it_needs(tmp_path, tiny_checkpoint, write):
    if shutil.which("unshare") is None:
        pytest.skip("needs unshare(1) to mount a small tmpfs in a private namespace")
    mount = tmp_path / "small"
    mount.mkdir()
    out = mount / "out"
    result = run_on_small_disk(mount, "512k", write[0], tiny_checkpoint, out, *write[1:])
    if result.returncode == 99:
        pytest.skip(f"this system does not let an unprivileged namespace mount a tmpfs: {result.stderr.strip()}")
    assert result.returncode == 2, result.stderr
    assert f"no space left on the device to write {out}" in result.stderr
    assert re.search(r"it needs [\d,]+ bytes", result.stderr), result.stderr
    assert result.stdout.split() == []  # nothing left on the small disk


def test_an_output_over_the_files_an_input_links_to_is_refused(tmp_path, tiny_checkpoint, capsys):
    """A Hugging Face cache snapshot is a folder of links into blobs/: writing over blobs/ would change the
    input, so it is refused like the input itself, with and without --force."""
    blobs, snapshot = tmp_path / "hub" / "blobs", tmp_path / "hub" / "snapshot"
    blobs.mkdir(parents=True)
    snapshot.mkdir()
    for path in tiny_checkpoint.iterdir():
        shutil.copy(path, blobs / (path.name + ".blob"))
        (snapshot / path.name).symlink_to(Path("..") / "blobs" / (path.name + ".blob"))
    before = hashes(blobs, snapshot)
    for out in (blobs, blobs / "config.json.blob"):
        for force in ([], ["--force"]):
            assert main(["depth", str(snapshot), str(out), "--layer-spec", "0:2", *force]) == 2
            assert "through its link to" in capsys.readouterr().err
    assert hashes(blobs, snapshot) == before


def test_check_reports_are_claimed_outputs(tmp_path, tiny_checkpoint, capsys):
    """--json and --plot: an existing file is replaced only with --force, a folder in the way or a missing
    parent is exit 2 before the check runs (exit 1 means drifted), and both files appear whole."""
    report = tmp_path / "report.json"
    report.write_text("precious\n")
    args = ["check", str(tiny_checkpoint), "--layer-spec", "0:3", "--random-tokens", "--seq-len", "16"]
    assert main([*args, "--json", str(report)]) == 2 and report.read_text() == "precious\n"
    assert "already exists" in capsys.readouterr().err
    (tmp_path / "folder").mkdir()
    assert main([*args, "--json", str(tmp_path / "folder")]) == 2
    assert main([*args, "--json", str(report), "--plot", str(tmp_path / "drift.png"), "--force"]) == 1
    assert json.loads(report.read_text())["verdict"] == "drifted"
    assert (tmp_path / "drift.png").read_bytes().startswith(b"\x89PNG") and leftovers(report) == []


@pytest.mark.parametrize("argv", [
    ["check", "M", "--layer-spec", "0:3", "--seq-len", "0"],
    ["ablate", "M", "--sweep", "delete-one", "--num-sequences", "0"],
    ["heal", "M", "OUT", "--steps", "-1"],
    ["generate", "M", "--prompt", "hi", "--top-p", "2"],
    ["generate", "M", "--prompt", "hi", "--temperature", "-1"],
    ["show", "M", "--memory", "check", "--batch", "0"],
])
def test_sizes_and_rates_out_of_range_are_usage_errors(argv, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    assert exit_.value.code == 2 and "expected" in capsys.readouterr().err


@pytest.mark.parametrize("scale", [".nan", ".inf", "-.inf"])
def test_a_recipe_scale_that_is_not_finite_is_refused(tmp_path, tiny_checkpoint, scale, capsys):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(f"merge_method: passthrough\nslices:\n- sources:\n  - model: {tiny_checkpoint}\n"
                      f"    layer_range: [0, 2]\n    parameters: {{scale: [{{filter: o_proj, value: {scale}}}]}}\n")
    assert main(["depth", str(tiny_checkpoint), str(tmp_path / "out"), "--recipe", str(recipe)]) == 2
    assert "must be finite" in capsys.readouterr().err and not (tmp_path / "out").exists()
