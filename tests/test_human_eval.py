"""Human evaluation: the SQLite store, the statistics, the web app's validation over HTTP, the tools' error
handling, and a rater in real headless Chromium (Selenium + Debian's chromium and chromedriver)."""

from __future__ import annotations

import json
import os
import re
import sqlite3
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request

import pytest
from test_tools import run_in_process

from gpt_jax.human_eval import stats, store

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOOL = os.path.join(ROOT, "tools", "human_eval.py")
ENV = {**os.environ, "PYTHONPATH": ROOT}  # the tool imports this checkout's gpt_jax
CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"

PROMPTS = ["Write a haiku about the sea.", "Explain why the sky is blue.", "A synonym for 'happy'?"]
OUTPUTS_A = ["Waves fold into foam,\nsalt wind carries gull voices,\nthe tide keeps its time.",
             "Air scatters blue sunlight more than red.", "Joyful."]
OUTPUTS_B = ["The sea is big and wet.", "Rayleigh scattering <b>mostly</b>.", "glad & content"]


def _jsonl(path, prompts, outputs) -> str:
    lines = [json.dumps({"prompt": p, "output": o}) + "\n" for p, o in zip(prompts, outputs, strict=True)]
    path.write_text("".join(lines))
    return str(path)


@pytest.fixture
def files(tmp_path) -> dict:
    (tmp_path / "prompts.txt").write_text("\n".join(PROMPTS) + "\n")
    return {"prompts": str(tmp_path / "prompts.txt"), "a": _jsonl(tmp_path / "model_a.jsonl", PROMPTS, OUTPUTS_A),
            "b": _jsonl(tmp_path / "model_b.jsonl", PROMPTS, OUTPUTS_B), "db": str(tmp_path / "eval.sqlite")}


@pytest.fixture
def server(files):
    """The app on a free port in this process, with the three pairs loaded; yields (base URL, db path)."""
    from gpt_jax.human_eval import app

    conn = store.connect(files["db"])
    store.add_pairs(conn, PROMPTS, "model_a", OUTPUTS_A, "model_b", OUTPUTS_B, seed=0)
    conn.close()
    httpd, url = app.serve_in_thread(files["db"])
    yield url, files["db"]
    httpd.shutdown()
    httpd.server_close()


def call_tool(*args: str) -> tuple[int, str, str]:
    """tools/human_eval.py in this process, as its command line runs it: (exit code, stdout, stderr)."""
    proc = run_in_process(TOOL, *args)
    return proc.returncode, proc.stdout, proc.stderr


def db_state(db: str) -> tuple[int, list]:
    conn = sqlite3.connect(db)
    try:
        assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        assert conn.execute("PRAGMA foreign_key_check").fetchall() == []
        return conn.execute("SELECT COUNT(*) FROM pairs").fetchone()[0], \
            conn.execute("SELECT pair_id, choice, winner, comment, rater FROM ratings ORDER BY id").fetchall()
    finally:
        conn.close()


# ---------------------------------------------------------------------------------------------------------------
# Store and statistics


def test_left_right_order_is_seeded_and_mixed():
    prompts = [f"prompt {i}" for i in range(40)]
    sides = [store.left_side(0, p, "x", "y") for p in prompts]
    assert sides == [store.left_side(0, p, "x", "y") for p in prompts]
    assert 10 <= sides.count(1) <= 30
    assert sides != [store.left_side(1, p, "x", "y") for p in prompts]


def test_store_pairs_ratings_and_double_submits(tmp_path):
    conn = store.connect(str(tmp_path / "db.sqlite"))
    assert store.add_pairs(conn, PROMPTS, "m1", OUTPUTS_A, "m2", OUTPUTS_B, seed=3) == 3
    assert store.add_pairs(conn, PROMPTS, "m1", OUTPUTS_A, "m2", OUTPUTS_B, seed=3) == 0  # kept as they were
    pair = store.next_pair(conn, "ann")
    assert pair.id == 1 and pair.prompt == PROMPTS[0]
    assert {pair.left_system, pair.right_system} == {"m1", "m2"}
    assert pair.left_output == (OUTPUTS_A[0] if pair.left_system == "m1" else OUTPUTS_B[0])
    key = store.secret(conn)
    assert store.secret(conn) == key
    token = store.make_token(key, pair.id)
    assert store.check_token(key, pair.id, token) and not store.check_token(key, pair.id + 1, token)
    assert not store.check_token(key, pair.id, token[:-1] + ("1" if token.endswith("0") else "0"))
    assert store.add_rating(conn, pair.id, "b", "fine", "ann", token)
    assert not store.add_rating(conn, pair.id, "b", "fine", "ann", token)  # the same form again
    assert not store.add_rating(conn, pair.id, "a", "", "ann", store.make_token(key, pair.id))  # a second tab
    assert store.add_rating(conn, pair.id, "tie", "", "bob", store.make_token(key, pair.id))  # another rater
    with pytest.raises(KeyError):
        store.add_rating(conn, 99, "a", "", "ann", store.make_token(key, 99))
    assert store.next_pair(conn, "ann").id == 2 and store.progress(conn, "ann") == (1, 3)
    assert store.outcomes(conn) == [("m1", "m2", pair.right_system), ("m1", "m2", None)]
    conn.close()


def test_wilson_interval():
    low, high = stats.wilson_interval(5, 10)
    assert (round(low, 4), round(high, 4)) == (0.2366, 0.7634)
    low, high = stats.wilson_interval(10, 10)
    assert high == pytest.approx(1.0) and round(low, 4) == 0.7225
    assert stats.wilson_interval(0, 0) == (0.0, 1.0)


def test_summary_and_bradley_terry():
    outcomes = ([("a", "b", "a")] * 8 + [("a", "b", "b")] * 2 + [("b", "c", "b")] * 7 + [("b", "c", None)] * 2
                + [("a", "c", "a")] * 9 + [("c", "a", "c")])
    summary = stats.summarize(outcomes)
    ab = summary["pairs"][0]
    assert (ab["system"], ab["opponent"], ab["ratings"], ab["wins"], ab["losses"], ab["ties"]) == ("a", "b", 10, 8,
                                                                                                   2, 0)
    assert ab["win_rate"] == 0.8 and ab["ci_low"] < 0.8 < ab["ci_high"]
    bc = summary["pairs"][2]
    assert (bc["system"], bc["wins"], bc["ties"], bc["win_rate"]) == ("b", 7, 2, 8 / 9)
    assert [s["system"] for s in summary["systems"]] == ["a", "b", "c"]
    elo = {s["system"]: s["bt_elo"] for s in summary["systems"]}
    assert elo["a"] > elo["b"] > elo["c"]
    assert sum(elo.values()) / 3 == pytest.approx(1000.0)
    two = stats.summarize(outcomes[:10])
    assert all("bt_elo" not in s for s in two["systems"])
    text = stats.format_report(summary, raters=2)
    assert "| a | b | 10 | 8 | 2 | 0 | 0.800 |" in text and "Bradley-Terry" in text


# ---------------------------------------------------------------------------------------------------------------
# The web app over HTTP


def _get(url: str) -> str:
    with urllib.request.urlopen(url, timeout=10) as r:
        return r.read().decode()


def _post(url: str, body: bytes, content_type: str = "application/x-www-form-urlencoded") -> tuple[int, str]:
    request = urllib.request.Request(url + "/rate", data=body, headers={"Content-Type": content_type})
    opener = urllib.request.build_opener(_NoRedirect)
    try:
        with opener.open(request, timeout=10) as r:
            return r.status, r.headers.get("Location", "")
    except urllib.error.HTTPError as e:  # a 303 too: redirects are not followed
        return e.code, e.headers.get("Location") if e.code == 303 else e.read().decode()


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args, **kwargs):
        return None


def _form(page: str) -> dict:
    return dict(re.findall(r'<input type=hidden name=(\w+) value="([^"]*)">', page))


def test_rating_over_http_and_double_submit(server):
    url, db = server
    page = _get(url + "/?rater=ann")
    form = _form(page)
    assert form["pair_id"] == "1" and form["rater"] == "ann" and "0 of 3 pairs rated" in page
    body = urllib.parse.urlencode({**form, "choice": "a", "comment": "nicer <i>rhythm</i>"}).encode()
    assert _post(url, body) == (303, "/?rater=ann")
    assert _post(url, body) == (303, "/?rater=ann")  # a double submit: same answer, nothing new
    _, ratings = db_state(db)
    assert len(ratings) == 1 and ratings[0][:2] == (1, "a") and ratings[0][3:] == ("nicer <i>rhythm</i>", "ann")
    assert "&lt;b&gt;mostly&lt;/b&gt;" in _get(url + "/?rater=ann")  # pair 2, its outputs escaped
    assert "1 rating(s)" in _get(url + "/report")


def test_an_empty_output_says_so(tmp_path):
    from gpt_jax.human_eval import app

    db = str(tmp_path / "empty.sqlite")
    conn = store.connect(db)
    store.add_pairs(conn, ["a prompt"], "model_a", [""], "model_b", ["some text"], seed=0)
    conn.close()
    page = app.App(db).rate_page("ann").decode()
    assert page.count("(empty output)") == 1 and "some text" in page


def test_bad_posts_leave_the_database_as_it_was(server):
    url, db = server
    form = _form(_get(url + "/"))
    good = {**form, "choice": "tie", "comment": ""}
    other_token = store.make_token(store.secret(store.connect(db)), 99)

    def enc(fields: dict) -> bytes:
        return urllib.parse.urlencode(fields).encode()

    cases = [
        (enc({**good, "pair_id": "99"}), 400),  # unknown pair with this page's token: the token does not match
        (enc({**good, "pair_id": "99", "token": other_token}), 404),  # a genuine token, but no such pair
        (enc({**good, "pair_id": "abc"}), 400),
        (enc({**good, "pair_id": "-1"}), 400),
        (enc({**good, "choice": "left"}), 400),
        (enc({k: v for k, v in good.items() if k != "choice"}), 400),
        (enc({**good, "token": "forged.0123"}), 400),
        (enc({**good, "extra": "1"}), 400),
        (enc(good) + b"&choice=a", 400),  # a field twice
        (enc({**good, "comment": "x" * 5000}), 400),
        (enc(good).replace(b"comment=", b"comment=%FF%FE"), 400),  # not UTF-8
        (b"pair_id=1&&&", 400),
        (b"\xff\xfe\x00garbage", 400),
        (json.dumps(good).encode(), 415),
    ]
    for body, status in cases:
        got = _post(url, body) if status != 415 else _post(url, body, "application/json")
        assert got[0] == status, (body[:80], got)
    big = _post(url, b"comment=" + b"x" * (70 * 1024))
    assert big[0] == 413
    request = urllib.request.Request(url + "/rate", method="POST", headers={"Content-Length": "nope"})
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(request, timeout=10)
    assert e.value.code == 411
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(url + "/nope", timeout=10)
    assert e.value.code == 404
    assert db_state(db) == (3, [])
    assert _post(url, enc(good))[0] == 303  # the good form still works afterwards
    assert len(db_state(db)[1]) == 1


# ---------------------------------------------------------------------------------------------------------------
# The tool


def test_serve_and_report_reject_bad_input(files, tmp_path):
    code, _, err = call_tool("serve", f"--a={files['a']}", f"--b={files['b']}", "--prompts=/nope.txt",
                             f"--db={files['db']}")
    assert code == 2 and err.strip() == "error: cannot read --prompts /nope.txt: No such file or directory"
    short = _jsonl(tmp_path / "short.jsonl", PROMPTS[:2], OUTPUTS_B[:2])
    code, _, err = call_tool("serve", f"--a={files['a']}", f"--b={short}", f"--prompts={files['prompts']}",
                             f"--db={files['db']}")
    assert code == 2 and err.startswith("error: --b ") and "short.jsonl has no output for prompt 3" in err
    (tmp_path / "bad.jsonl").write_text('{"prompt": "x"}\nnot json\n')
    code, _, err = call_tool("serve", f"--a={tmp_path / 'bad.jsonl'}", f"--b={files['b']}",
                             f"--prompts={files['prompts']}", f"--db={files['db']}")
    assert code == 2 and "--a" in err and "line 2" in err
    code, _, err = call_tool("serve", f"--a={files['a']}", f"--b={files['b']}",
                             f"--prompts={files['prompts']}", f"--db={files['db']}", "--port=70000")
    assert code == 2 and "--port" in err
    code, _, err = call_tool("report", f"--db={tmp_path / 'none.sqlite'}")
    assert code == 2 and err.startswith("error: --db")
    (tmp_path / "junk.sqlite").write_bytes(b"this is not a database" * 100)
    code, _, err = call_tool("report", f"--db={tmp_path / 'junk.sqlite'}")
    assert code == 2 and err.startswith("error: --db") and len(err.strip().splitlines()) == 1
    assert not os.path.exists(files["db"])  # nothing was created by the failed starts


def test_report_ranks_three_systems(tmp_path):
    db = str(tmp_path / "three.sqlite")
    conn = store.connect(db)
    key = store.secret(conn)
    for first, second in (("x", "y"), ("y", "z"), ("x", "z")):
        store.add_pairs(conn, PROMPTS, first, OUTPUTS_A, second, OUTPUTS_B)
    for pair_id in range(1, 10):
        pair = store.get_pair(conn, pair_id)
        better = min(pair.left_system, pair.right_system)  # x beats y and z, y beats z
        store.add_rating(conn, pair_id, "a" if pair.left_system == better else "b", "", "", store.make_token(key,
                                                                                                            pair_id))
    conn.close()
    code, out, _ = call_tool("report", f"--db={db}")
    assert code == 0 and "| x | y | 3 | 3 | 0 | 0 | 1.000 |" in out and "Bradley-Terry" in out
    code, out, _ = call_tool("report", f"--db={db}", "--json")
    assert [s["system"] for s in json.loads(out)["systems"]] == ["x", "y", "z"]


@pytest.mark.slow
def test_outputs_generated_by_a_model(tiny_workdir):
    from gpt_jax.human_eval import systems

    workdir = tiny_workdir
    outputs = systems.load_outputs(workdir, ["ROMEO:", "JULIET:"], "--a", max_new_tokens=5)
    assert len(outputs) == 2 and all(isinstance(o, str) and len(o) <= 5 for o in outputs)
    assert systems.system_name(workdir) == "tiny_model"


# ---------------------------------------------------------------------------------------------------------------
# In a real browser


def _chromium():
    if not (os.path.exists(CHROMIUM) and os.path.exists(CHROMEDRIVER)):
        pytest.skip("Debian's chromium and chromium-driver are not installed (apt-get install chromium "
                    "chromium-driver)")
    webdriver = pytest.importorskip("selenium.webdriver")
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-dev-shm-usage", "--window-size=1200,800", f"--user-data-dir={tempfile.mkdtemp()}"):
        options.add_argument(flag)
    return webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)


def _start_serve(files) -> tuple[subprocess.Popen, str]:
    """tools/human_eval.py serve as a user starts it, on a free port; returns the process and its URL."""
    proc = subprocess.Popen([sys.executable, TOOL, "serve", f"--a={files['a']}", f"--b={files['b']}",
                             f"--prompts={files['prompts']}", f"--db={files['db']}", "--port=0"],
                            stderr=subprocess.PIPE, text=True, cwd=ROOT, env=ENV)
    deadline = time.time() + 30
    while time.time() < deadline:
        line = proc.stderr.readline()
        match = re.search(r"serving on (http://\S+?)/ ", line)
        if match:
            return proc, match.group(1)
        if not line and proc.poll() is not None:
            break
    proc.kill()
    raise AssertionError(f"serve did not start: {proc.stderr.read()}")


def test_rating_three_pairs_in_chromium(files, tmp_path):
    driver = _chromium()
    from selenium.common.exceptions import NoSuchElementException, StaleElementReferenceException
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    proc, url = _start_serve(files)
    try:
        driver.get(url + "/?rater=ann")
        driver.save_screenshot(str(tmp_path / "pair.png"))
        expected = {"model_a": 0, "model_b": 0, "tie": 0}
        # pair 1: prefer model_a's output, wherever it is shown; pair 2: model_b's; pair 3: a tie
        for want, comment in (("model_a", "better imagery"), ("model_b", ""), ("tie", "")):
            prompt = driver.find_element(By.ID, "prompt").text
            left = driver.find_element(By.ID, "output-a").text
            index = PROMPTS.index(prompt)
            left_is_a = left == OUTPUTS_A[index]
            assert left_is_a or left == OUTPUTS_B[index]
            if comment:
                driver.find_element(By.ID, "comment").send_keys(comment)
            button = "choose-tie" if want == "tie" else ("choose-a" if left_is_a == (want == "model_a")
                                                         else "choose-b")
            if want == "tie":  # a double click: the browser may post the form twice
                driver.execute_script("arguments[0].click(); arguments[0].click();",
                                      driver.find_element(By.ID, button))
            else:
                driver.find_element(By.ID, button).click()
            expected[want] += 1
            progress = f"{sum(expected.values())} of 3 pairs rated"
            WebDriverWait(driver, 20, ignored_exceptions=(NoSuchElementException, StaleElementReferenceException)) \
                .until(lambda d: progress in d.find_element(By.ID, "progress").text)
        assert driver.find_element(By.ID, "done").text.startswith("All 3 pairs are rated")
        driver.refresh()
        driver.back()
        driver.refresh()
        assert "3 of 3 pairs rated" in driver.find_element(By.ID, "progress").text
        driver.get(url + "/report")
        assert "3 rating(s)" in driver.find_element(By.ID, "summary").text
        driver.save_screenshot(str(tmp_path / "report.png"))
    finally:
        driver.quit()
        proc.terminate()
        proc.wait(timeout=10)
    pairs, ratings = db_state(files["db"])
    assert pairs == 3 and len(ratings) == 3
    assert [r[4] for r in ratings] == ["ann"] * 3 and ratings[0][3] == "better imagery"
    result = subprocess.run([sys.executable, TOOL, "report", f"--db={files['db']}"], capture_output=True, text=True,
                            env=ENV)
    assert result.returncode == 0, result.stderr
    assert "3 rating(s) by 1 rater(s)" in result.stdout
    assert "| model_a | model_b | 3 | 1 | 1 | 1 | 0.500 |" in result.stdout
