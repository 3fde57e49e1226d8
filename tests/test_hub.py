"""Hub round trips with the real huggingface_hub client against a local Hub-compatible server (127.0.0.1 only)."""
from __future__ import annotations

import itertools
import json
from pathlib import Path

import huggingface_hub.constants
import pytest
import torch
from huggingface_hub import ModelCard
from hypothesis import HealthCheck, given, settings

from hf_gauge import Gauge, GaugeError, SignedPermutation, load_gauge, push_gauge
from hf_gauge.hub import gauge_card, gauge_id, template_path
from hf_gauge.readme import INDEX_END, INDEX_START
from hub_server import HubServer, local_network_only  # noqa: F401  (fixture)
from test_readme import readmes

pytestmark = pytest.mark.usefixtures("local_network_only")


@pytest.fixture
def hub():
    with HubServer() as server:
        yield server


def gauge(seed: int) -> Gauge:
    return Gauge(SignedPermutation.random(24, seed), mlp={1: SignedPermutation.random(40, seed + 100)},
                 source={"model_id": "org/base", "model_type": "llama", "hidden_size": 24, "fingerprint": "aa"},
                 target={"model_id": "org/finetune", "model_type": "llama", "hidden_size": 24, "fingerprint": "bb"},
                 method="signed", metrics={"mean_matched": 0.99 - seed / 100})


def test_push_then_download_into_fresh_cache(hub: HubServer, tmp_path: Path) -> None:
    # a checkpoint already lives in the repo: its config.json and README must survive the gauge push
    from huggingface_hub import HfApi
    HfApi(endpoint=hub.url).create_repo("org/model")
    hub.commit("org/model", {"config.json": b'{"model_type": "llama"}', "README.md": b"# the model card\n"})
    g = gauge(1)
    info = push_gauge(g, "org/model", path_in_repo="gauges/to-finetune", endpoint=hub.url)
    files = hub.files("org/model")
    assert files["config.json"] == b'{"model_type": "llama"}'
    root = files["README.md"].decode()                     # the user's card kept; an index section added
    assert root.startswith("# the model card\n") and "hf_gauge:gauges:start" in root
    assert not root.startswith("---")                      # the card describes the model: no gauge metadata added
    assert {"gauges/to-finetune/gauge.safetensors", "gauges/to-finetune/gauge_config.json",
            "gauges/to-finetune/README.md"} <= set(files)
    assert info.oid == hub.repos["org/model"].branches["main"]
    back = load_gauge("org/model", subfolder="gauges/to-finetune", cache_dir=tmp_path / "cache", endpoint=hub.url)
    assert back == g and back.source == g.source and back.target == g.target and back.metrics == g.metrics
    for n in g.spaces:
        assert torch.equal(back[n].perm, g[n].perm) and torch.equal(back[n].sign, g[n].sign)
    # the model card: rendered from the packaged template, with metadata and usage
    card = ModelCard(files["gauges/to-finetune/README.md"].decode())
    assert card.data.library_name == "hf_gauge" and card.data.base_model == "org/base"
    assert "org/base" in card.text and "org/finetune" in card.text and "`signed`" in card.text
    assert 'subfolder="gauges/to-finetune"' in card.text and "mean_matched" in card.text
    methods = {m for m, _ in hub.log}
    assert methods <= {"POST", "HEAD", "GET", "PUT"}
    assert hub.lfs_paths("org/model") == ["gauges/to-finetune/gauge.safetensors"]    # pushed through LFS, as on the Hub


def test_default_path_and_root_refused(hub: HubServer) -> None:
    g = gauge(2)
    push_gauge(g, "org/fresh", endpoint=hub.url)                # creates the repo
    assert f"gauges/{gauge_id(g)}/gauge_config.json" in hub.files("org/fresh")
    for bad in ("", "/", ".", "gauges/../x"):
        with pytest.raises(GaugeError, match="subfolder"):
            push_gauge(g, "org/fresh", path_in_repo=bad, endpoint=hub.url)
    root = hub.files("org/fresh")["README.md"].decode()     # the root card is the index, not the gauge's own card
    assert f"[`gauges/{gauge_id(g)}`]" in root and "Fit metrics" not in root


def test_revisions_commits_and_branches(hub: HubServer, tmp_path: Path) -> None:
    g1, g2, g3 = gauge(1), gauge(2), gauge(3)
    c1 = push_gauge(g1, "org/m", path_in_repo="gauges/g", endpoint=hub.url).oid
    c2 = push_gauge(g2, "org/m", path_in_repo="gauges/g", endpoint=hub.url).oid   # a new commit on main
    push_gauge(g3, "org/m", path_in_repo="gauges/g", revision="experiment", endpoint=hub.url)  # a new branch
    assert c1 != c2
    cache = tmp_path / "cache"
    kw = dict(subfolder="gauges/g", cache_dir=cache, endpoint=hub.url)
    assert load_gauge("org/m", revision=c1, **kw) == g1
    assert load_gauge("org/m", revision=c2, **kw) == g2
    assert load_gauge("org/m", **kw) == g2
    assert load_gauge("org/m", revision="experiment", **kw) == g3
    assert load_gauge("org/m", revision="experiment", **kw) != g2
    # each revision was cached separately; offline re-loads come from the cache without any request
    n = len(hub.log)
    assert load_gauge("org/m", revision=c1, local_files_only=True, **kw) == g1
    assert load_gauge("org/m", revision="experiment", local_files_only=True, **kw) == g3
    assert len(hub.log) == n


def test_offline_mode_env_uses_cache(hub: HubServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    g = gauge(4)
    push_gauge(g, "org/off", path_in_repo="gauges/g", endpoint=hub.url)
    kw = dict(subfolder="gauges/g", cache_dir=tmp_path / "cache", endpoint=hub.url)
    with pytest.raises(GaugeError, match="not in the local cache"):
        load_gauge("org/off", local_files_only=True, **kw)
    assert load_gauge("org/off", **kw) == g
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)   # what HF_HUB_OFFLINE=1 sets
    n = len(hub.log)
    assert load_gauge("org/off", **kw) == g
    assert len(hub.log) == n
    with pytest.raises(GaugeError, match="not in the local cache"):
        load_gauge("org/off", revision="other", **kw)


def test_hub_errors_are_gauge_errors(hub: HubServer, tmp_path: Path) -> None:
    push_gauge(gauge(5), "org/e", path_in_repo="gauges/g", endpoint=hub.url)
    kw = dict(cache_dir=tmp_path / "c", endpoint=hub.url)
    with pytest.raises(GaugeError, match="subfolder"):
        load_gauge("org/e", **kw)                                    # gauge files are not at the root
    with pytest.raises(GaugeError, match="no gauge.safetensors"):
        load_gauge("org/e", subfolder="gauges/other", **kw)
    with pytest.raises(GaugeError, match="not found"):
        load_gauge("org/e", subfolder="gauges/g", revision="nope", **kw)
    with pytest.raises(GaugeError, match="neither a local folder nor a Hub repository"):
        load_gauge("org/missing", subfolder="gauges/g", **kw)


def test_corrupt_upload_is_refused_on_download(hub: HubServer, tmp_path: Path) -> None:
    push_gauge(gauge(6), "org/c", path_in_repo="gauges/g", endpoint=hub.url)
    cfg = json.loads(hub.files("org/c")["gauges/g/gauge_config.json"])
    cfg["format_version"] = 99
    hub.commit("org/c", {"gauges/g/gauge_config.json": json.dumps(cfg).encode()})
    with pytest.raises(GaugeError, match="unknown gauge format version 99"):
        load_gauge("org/c", subfolder="gauges/g", cache_dir=tmp_path / "c", endpoint=hub.url)


def test_card_template_is_packaged_and_renders_without_metadata() -> None:
    p = template_path()
    assert p.is_file() and p.parent.name == "templates"
    card = gauge_card(Gauge(SignedPermutation.identity(4)))
    assert card.data.library_name == "hf_gauge" and card.data.base_model is None
    assert "No fit metrics were recorded" in card.text and "unknown" in card.text


# --------------------------------------------------------------------------- cards that work on the Hub
def test_root_card_index_created_updated_and_user_text_kept(hub: HubServer) -> None:
    from huggingface_hub import HfApi
    HfApi(endpoint=hub.url).create_repo("org/own")
    user = b"---\nlicense: mit\nbase_model: org/other\n---\n\n# My model\n\nMy own words.\n"
    hub.commit("org/own", {"README.md": user})
    g1, g2 = gauge(1), gauge(2)
    push_gauge(g1, "org/own", path_in_repo="gauges/a", endpoint=hub.url)
    push_gauge(g2, "org/own", path_in_repo="gauges/b", endpoint=hub.url)
    push_gauge(g1, "org/own", path_in_repo="gauges/a", endpoint=hub.url)       # again: its row is replaced
    pushed = hub.files("org/own")["README.md"]
    assert pushed.startswith(user)                          # the user's bytes, metadata included, untouched
    card = ModelCard(pushed.decode())
    assert card.data.license == "mit" and card.data.base_model == "org/other" and card.data.tags is None
    assert card.text.count("hf_gauge:gauges:start") == 1
    rows = [ln for ln in card.text.splitlines() if ln.startswith("| [`")]
    assert [r.split("`")[1] for r in rows] == ["gauges/a", "gauges/b"]
    # a repository without a card gets one: base_model and its relation, the index
    push_gauge(g1, "org/new", path_in_repo="gauges/a", endpoint=hub.url)
    new = ModelCard(hub.files("org/new")["README.md"].decode())
    assert new.data.base_model == "org/base" and new.data.base_model_relation == "adapter"
    assert new.data.library_name == "hf_gauge" and "[`gauges/a`]" in new.text


_PUSHES = itertools.count()


@settings(max_examples=4, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(user=readmes())
def test_push_keeps_every_byte_of_the_users_readme(hub: HubServer, user: str) -> None:
    """Issue 23.4: CRLF, trailing blanks, a BOM, YAML comments/quotes/flow lists and fenced examples of the markers
    survive a push byte for byte; only hf_gauge's section is appended, and a second push replaces only it."""
    from huggingface_hub import HfApi
    repo = f"org/readme{next(_PUSHES)}"
    HfApi(endpoint=hub.url).create_repo(repo)
    hub.commit(repo, {"README.md": user.encode()})
    push_gauge(gauge(1), repo, path_in_repo="gauges/a", endpoint=hub.url)
    first = hub.files(repo)["README.md"]
    assert first.startswith(user.encode())
    a = first.index(INDEX_START.encode(), len(user.encode()))
    assert first[len(user.encode()):a].strip(b"\r\n`~ ") == b"" and first.rstrip(b"\r\n").endswith(INDEX_END.encode())
    push_gauge(gauge(2), repo, path_in_repo="gauges/b", endpoint=hub.url)
    second = hub.files(repo)["README.md"]
    assert second[:a] == first[:a] and second.endswith(INDEX_END.encode() + first[len(first.rstrip(b"\r\n")):])
    assert [ln.split("`")[1] for ln in second[a:].decode().splitlines() if ln.startswith("| [`")] == \
        ["gauges/a", "gauges/b"]


@pytest.mark.parametrize("readme, match", [(b"# caf\xe9\n", "not UTF-8"), (b"---\nlicense: [mit\n---\n", "YAML")])
def test_unreadable_readme_refused_before_anything_is_pushed(hub: HubServer, readme: bytes, match: str) -> None:
    from huggingface_hub import HfApi
    HfApi(endpoint=hub.url).create_repo("org/bad")
    hub.commit("org/bad", {"README.md": readme})
    before = {k: dict(v.branches) for k, v in hub.repos.items()}
    for rev in (None, "exp"):
        with pytest.raises(GaugeError, match=f"README.md of org/bad.*{match}"):
            push_gauge(gauge(1), "org/bad", path_in_repo="gauges/a", revision=rev, endpoint=hub.url)
    assert {k: dict(v.branches) for k, v in hub.repos.items()} == before     # no commit, no branch
    assert hub.files("org/bad")["README.md"] == readme and not any(f.startswith("gauges/") for f in hub.files("org/bad"))


def test_push_create_pr_token_message_and_lfs(hub: HubServer) -> None:
    g = gauge(4)
    push_gauge(g, "org/pr", path_in_repo="gauges/first", endpoint=hub.url)
    main_before = dict(hub.files("org/pr"))
    info = push_gauge(g, "org/pr", path_in_repo="gauges/second", endpoint=hub.url, create_pr=True, token="hf_test",
                      commit_message="propose a gauge")
    assert info.pr_url and info.pr_revision == "refs/pr/1"
    assert hub.files("org/pr") == main_before                              # main untouched
    pr = hub.files("org/pr", "refs/pr/1")
    assert "gauges/second/gauge.safetensors" in pr and "[`gauges/second`]" in pr["README.md"].decode()
    assert "gauges/second/gauge.safetensors" in hub.lfs_paths("org/pr", "refs/pr/1")
    assert "Bearer hf_test" in hub.auth


def test_list_gauges_and_missing_subfolder_lists_them(hub: HubServer, tmp_path: Path) -> None:
    from hf_gauge import list_gauges
    for name, seed in (("gauges/x", 1), ("gauges/y", 2), ("deep/er/z", 3)):
        push_gauge(gauge(seed), "org/many", path_in_repo=name, endpoint=hub.url)
    assert list_gauges("org/many", endpoint=hub.url) == ["deep/er/z", "gauges/x", "gauges/y"]
    with pytest.raises(GaugeError, match=r"gauges/x, gauges/y"):
        load_gauge("org/many", cache_dir=tmp_path / "c", endpoint=hub.url)
    with pytest.raises(GaugeError, match="not a valid Hub repository id"):
        list_gauges("bad//id", endpoint=hub.url)


def test_push_pins_revisions_and_maps_cache_paths_to_ids(hub: HubServer) -> None:
    from huggingface_hub import HfApi
    HfApi(endpoint=hub.url).create_repo("org/base")
    sha = hub.commit("org/base", {"README.md": b"---\nlicense: apache-2.0\n---\n# base\n", "config.json": b"{}"})
    cached = "/home/u/.cache/huggingface/hub/models--org--finetune/snapshots/" + "ab" * 20
    g = Gauge(SignedPermutation.random(8, 0), source={"model_id": "org/base", "model_type": "llama"},
              target={"model_id": cached, "model_type": "llama"}, method="signed")
    push_gauge(g, "org/pins", path_in_repo="gauges/p", endpoint=hub.url)
    conf = json.loads(hub.files("org/pins")["gauges/p/gauge_config.json"])
    assert conf["source"]["revision"] == sha                      # through HfApi.model_info
    assert conf["target"]["model_id"] == "org/finetune" and conf["target"]["revision"] == "ab" * 20
    card = ModelCard(hub.files("org/pins")["gauges/p/README.md"].decode())
    assert card.data.license == "apache-2.0" and card.data.base_model == "org/base" and cached not in card.text
    assert g.target["model_id"] == cached                         # the caller's gauge is not modified
    push_gauge(g, "org/pins", path_in_repo="gauges/q", endpoint=hub.url, target_id="org/renamed")
    assert json.loads(hub.files("org/pins")["gauges/q/gauge_config.json"])["target"]["model_id"] == "org/renamed"


def test_card_metrics_rounded_explained_and_snippet_runs(hub: HubServer, tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    import re

    import huggingface_hub.constants as hc
    g = gauge(5)
    g.metrics.update(min_margin=0.123456789, n_low_confidence=0)
    push_gauge(g, "org/snip", path_in_repo="gauges/s", endpoint=hub.url)
    text = hub.files("org/snip")["gauges/s/README.md"].decode()
    assert "| min_margin | 0.1235 | smallest gap" in text and "0.123456789" not in text
    snippet = re.search(r"```python\n(.*?)```", text, re.S).group(1)
    monkeypatch.setattr(hc, "ENDPOINT", hub.url)
    monkeypatch.setattr(hc, "HUGGINGFACE_CO_URL_TEMPLATE", hub.url + "/{repo_id}/resolve/{revision}/{filename}")
    monkeypatch.setattr(hc, "HF_HUB_CACHE", str(tmp_path / "cache"))
    ns: dict = {}
    exec(compile(snippet, "card-snippet", "exec"), ns)               # the card's usage snippet runs as written
    assert torch.equal(ns["vector_in_target"], g.residual(ns["vector_in_source"]))


def test_save_pretrained_writes_the_card(tmp_path: Path) -> None:
    g = gauge(6)
    g.save_pretrained(tmp_path / "g")
    card = ModelCard.load(tmp_path / "g" / "README.md")
    assert card.data.library_name == "hf_gauge" and card.data.base_model == "org/base"
    assert load_gauge(tmp_path / "g") == g


# ------------------------------------------------------------------------------------------------ issue 23, item 6
@pytest.mark.parametrize("path", ["gauges/a\nb", "gauges/a\rb", "gauges/\x00x", "gauges/a\tb", "gauges/\x1b[2Jx",
                                  "gauges/a\u0085b", "gauges\\a"])
def test_push_refuses_control_characters_in_path_in_repo(hub: HubServer, path: str) -> None:
    with pytest.raises(GaugeError, match="control character"):
        push_gauge(gauge(1), "org/model", path_in_repo=path, endpoint=hub.url)
    assert "org/model" not in hub.repos                           # refused before any request


def test_push_answered_500_names_the_status_and_the_repository(hub: HubServer) -> None:
    hub.fail_paths.add("/commit/")
    with pytest.raises(GaugeError) as err:
        push_gauge(gauge(1), "org/model", path_in_repo="gauges/x", endpoint=hub.url)
    msg = str(err.value)
    assert "\n" not in msg and "HTTP 500" in msg and "'org/model'" in msg and "retry later" in msg
    assert not any(p.startswith("gauges/") for p in hub.files("org/model"))


@pytest.mark.parametrize("sub", ["../other", "gauges/../../x", "gauges/..", "/abs/gauges", "gauges/a\nb", "C:/x"])
def test_subfolder_with_dotdot_is_refused_locally_and_on_the_hub(hub: HubServer, tmp_path: Path, sub: str) -> None:
    g = gauge(1)
    g.save_pretrained(tmp_path / "repo" / "gauges" / "x")
    g.save_pretrained(tmp_path / "other")                          # what "../other" would reach from the repo
    for ref in (str(tmp_path / "repo"), "org/model"):
        with pytest.raises(GaugeError, match="subfolder="):
            load_gauge(ref, subfolder=sub, endpoint=hub.url)
        with pytest.raises(GaugeError, match="subfolder="):
            Gauge.from_pretrained(ref, subfolder=sub, endpoint=hub.url)
    assert not hub.log                                             # refused before any request


# --------------------------------------------------------------------------- cards as a GFM renderer reads them
def test_every_card_renders_its_tables_whole(hub: HubServer) -> None:
    """Gauge card, root index and gauged-checkpoint card through markdown-it-py's GFM table rule: every row has its
    header's cells (an unescaped ``|`` in ``mean |correlation|`` cut the metric rows)."""
    from gfm import gfm_tables

    from hf_gauge.hub import checkpoint_card
    g = gauge(7)
    g.metrics.update(min_margin=0.5, n_low_confidence=0, method="a|b")
    g.source["model_type"] = "llama|odd"
    push_gauge(g, "org/gfm", path_in_repo="gauges/t", endpoint=hub.url)
    card = ModelCard(hub.files("org/gfm")["gauges/t/README.md"].decode())
    tables = gfm_tables(card.text)
    assert [len(t[0]) for t in tables] == [3, 3, 3]                 # what it maps, spaces, metrics
    metrics = {r[0]: r for r in tables[2][1:]}
    assert metrics["mean_matched"][2].startswith("mean |correlation| of the matched")
    assert metrics["method"][1] == "a|b" and tables[0][3][1] == "`llama|odd`"
    index = gfm_tables(ModelCard(hub.files("org/gfm")["README.md"].decode()).text)
    assert len(index) == 1 and len(index[0]) == 2 and index[0][1][0] == "[`gauges/t`](gauges/t)"
    ckpt = checkpoint_card(g, "org/base", "---\nlicense: mit\n---\n# base\n")
    assert gfm_tables(ckpt.text) == []                               # no table to cut; its metadata:
    assert ckpt.data.base_model == "org/base" and ckpt.data.base_model_relation == "finetune"
    assert ckpt.data.library_name == "transformers" and ckpt.data.license == "mit"


def test_gauge_spelling_of_the_cli_and_card_loads(hub: HubServer, tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """``Gauge.from_pretrained("org/repo/gauges/name")`` (the spelling the CLI and the card write) loads; ``subfolder=``
    still works; bad subfolder parts are refused."""
    g = gauge(8)
    push_gauge(g, "org/spell", path_in_repo="gauges/x", endpoint=hub.url)
    kw = {"endpoint": hub.url, "cache_dir": tmp_path / "c"}
    assert Gauge.from_pretrained("org/spell/gauges/x", **kw) == g
    assert load_gauge("org/spell/gauges", subfolder="x", **kw) == g
    assert load_gauge("org/spell", subfolder="gauges/x", **kw) == g
    for bad in ("org/spell/gauges/../x", "org/spell//x", "org/spell/./x"):
        with pytest.raises(GaugeError, match="may not be empty"):
            load_gauge(bad, **kw)
    (tmp_path / "out").mkdir()
    monkeypatch.chdir(tmp_path)                  # a typo under an existing local folder stays a local path
    with pytest.raises(GaugeError, match="no gauge folder at out/gauges/typo"):
        load_gauge("out/gauges/typo", **kw)


def test_every_card_snippet_runs_on_its_own(hub: HubServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each python block of a pushed gauge card runs alone (a fresh namespace) against the local Hub, including the
    one that downloads the source model from the Hub and moves it through the gauge."""
    import re

    import huggingface_hub.constants as hc
    from conftest import tiny_model
    from huggingface_hub import HfApi

    import hf_gauge
    model = tiny_model("llama", hidden_size=16, layers=1, heads=2, kv_heads=1, intermediate=24)
    model.save_pretrained(tmp_path / "base")
    HfApi(endpoint=hub.url).create_repo("org/tinybase")
    hub.commit("org/tinybase", {f.name: f.read_bytes() for f in (tmp_path / "base").iterdir()})
    g = hf_gauge.random_gauge(model, seed=3)
    push_gauge(g, "org/snips", path_in_repo="gauges/s", endpoint=hub.url, source_id="org/tinybase",
               target_id="org/tinybase-gauged")
    text = hub.files("org/snips")["gauges/s/README.md"].decode()
    snippets = re.findall(r"```python\n(.*?)```", text, re.S)
    assert len(snippets) == 2
    monkeypatch.setattr(hc, "ENDPOINT", hub.url)
    monkeypatch.setattr(hc, "HUGGINGFACE_CO_URL_TEMPLATE", hub.url + "/{repo_id}/resolve/{revision}/{filename}")
    monkeypatch.setattr(hc, "HF_HUB_CACHE", str(tmp_path / "cache"))
    for i, code in enumerate(snippets):
        ns: dict = {}
        exec(compile(code, f"card-snippet-{i}", "exec"), ns)
    index = hub.files("org/snips")["README.md"].decode()          # the root index's inline load call, too
    (call,) = re.findall(r"`(hf_gauge\.load_gauge\(.*?\))`", index)
    assert eval(call, {"hf_gauge": hf_gauge}) == g
    moved = hf_gauge.apply_gauge(model, g)
    assert all(torch.equal(p, q) for p, q in zip(ns["model"].state_dict().values(), moved.state_dict().values()))


def test_download_snapshot_failures_are_one_line_gauge_errors(hub: HubServer, tmp_path: Path) -> None:
    """The one snapshot download (checkpoints, adapters, CLI Hub objects): each failure names what was asked for."""
    from hf_gauge.hub import download_snapshot
    kw = dict(cache_dir=tmp_path / "c", endpoint=hub.url)
    cases = [("org/missing", {}, "nor a Hub repository you can access"),
             ("org/missing", {"local_files_only": True}, "not in the local cache"),
             ("org/bad--name", {}, "nor a Hub repository id")]
    for repo, extra, phrase in cases:
        with pytest.raises(GaugeError, match=phrase) as e:
            download_snapshot(repo, f"{repo}/sub", **kw, **extra)
        assert "\n" not in str(e.value) and f"'{repo}/sub'" in str(e.value)
