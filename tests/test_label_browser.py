"""The labelling app in a real browser: Debian's Chromium, driven by Selenium through Debian's chromedriver (nothing is
downloaded), against `dicom_prep_label` in its own process. Skipped where chromium or chromium-driver is not installed
(CI installs both: .ci/run)."""
import json, os, shutil, tempfile, threading
from contextlib import contextmanager

import pytest

from conftest import query
from test_label import CLASSES, image_ids, index_fixture, label_server, label_state   # noqa: F401 (index_fixture: the fixture `index`)

CHROMIUM, DRIVER = shutil.which('chromium'), '/usr/bin/chromedriver'
pytestmark = pytest.mark.skipif(not (CHROMIUM and os.access(DRIVER, os.X_OK)),
                                reason='needs chromium and chromium-driver (apt-get install chromium chromium-driver)')
webdriver = pytest.importorskip('selenium.webdriver')
from selenium.webdriver.chrome.service import Service          # noqa: E402
from selenium.webdriver.common.action_chains import ActionChains  # noqa: E402
from selenium.webdriver.common.actions.wheel_input import ScrollOrigin  # noqa: E402
from selenium.webdriver.common.by import By                    # noqa: E402
from selenium.webdriver.common.keys import Keys                # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait        # noqa: E402

FLAGS = ('--headless=new', '--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run', '--disable-background-networking',
         '--disable-component-update', '--disable-sync', '--window-size=1400,900')


@contextmanager
def chromium():
    "A headless Chromium with a fresh profile, through Debian's chromedriver (Selenium Manager offline: it fetches nothing)."
    os.environ['SE_OFFLINE'] = 'true'
    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for f in FLAGS: opts.add_argument(f)
    with tempfile.TemporaryDirectory() as profile:
        opts.add_argument(f'--user-data-dir={profile}')
        driver = webdriver.Chrome(service=Service(executable_path=DRIVER), options=opts)
        try: yield driver
        finally: driver.quit()


def keys(d, *ks): ActionChains(d).send_keys(*ks).perform()
def until(d, check, timeout=10): return WebDriverWait(d, timeout, 0.05).until(lambda _: check())
def tiles(d) -> list[int]: return [int(t.get_attribute('data-id')) for t in d.find_elements(By.CSS_SELECTOR, '.tile')]
def focused(d) -> int|None: return (v := d.execute_script('return document.activeElement.dataset.id')) and int(v)   # atomic while a page reloads
def n_done(d) -> int: return len(d.find_elements(By.CSS_SELECTOR, '.tile.done'))


def test_label_by_keyboard_undo_series_filter_reload(index):
    "20 labels typed over three pages of 8, an undo, a series, the arrows, the unlabelled filter and a reload, against the DB."
    names, typed = image_ids(index), '12312312312312312312'
    with label_server(index, 'alice', 'T', '--per-page', '8') as (url, _), chromium() as d:
        d.get(url + '/?token=T')
        ids = sorted(names)
        assert tiles(d) == ids[:8] and focused(d) == ids[0]           # nothing labelled yet: the first image has focus
        keys(d, Keys.ARROW_RIGHT, Keys.ARROW_RIGHT, Keys.ARROW_LEFT)
        assert focused(d) == ids[1]
        keys(d, Keys.ARROW_LEFT)
        for start in (0, 8, 16):                                       # a page at a time: a key typed while the next page loads is lost
            keys(d, typed[start:start + 8 if start < 16 else 20])
            until(d, lambda start=start: focused(d) == ids[min(start + 8, 20)])    # past the last tile of a page: the next page, focus at its start
        want = {('image', names[i][0], 'alice', CLASSES[int(k) - 1]) for i, k in zip(ids, typed, strict=False)}   # the first 20
        until(d, lambda: label_state(index) == want)
        keys(d, 'u')                                                   # undo: the last label goes, and its tile has focus
        want -= {('image', names[ids[19]][0], 'alice', CLASSES[int(typed[19]) - 1])}
        until(d, lambda: label_state(index) == want and focused(d) == ids[19])
        keys(d, Keys.ENTER)                                            # its series, frame by frame
        until(d, lambda: '/series/' in d.current_url)
        assert d.find_element(By.ID, 'pos').text.startswith('frame ')
        keys(d, '3')                                                   # the whole series
        series = names[ids[19]][1]
        want |= {('series', series, 'alice', 'artefact')}
        until(d, lambda: label_state(index) == want)
        keys(d, Keys.ESCAPE)
        until(d, lambda: '/series/' not in d.current_url)
        d.get(url + f'/?state=all&after={ids[7]}')                     # the arrows cross page edges both ways
        keys(d, Keys.ARROW_LEFT)
        until(d, lambda: focused(d) == ids[7] and tiles(d) == ids[:8])
        d.get(url + '/?state=unlabelled')                              # reload, filtered: what nobody labelled
        labelled = set(ids[:19]) | {i for i in ids if names[i][1] == series}
        assert tiles(d) == [i for i in ids if i not in labelled][:8]
        d.get(url + f'/series/{ids[21]}')                              # another study's series: the arrows step, Shift+2 labels the study
        n = sum(v[1] == names[ids[21]][1] for v in names.values())
        keys(d, Keys.ARROW_RIGHT)
        assert d.find_element(By.ID, 'pos').text == f"frame 2/{n}"
        ActionChains(d).scroll_from_origin(ScrollOrigin.from_element(d.find_element(By.ID, 'frame')), 0, 120).perform()   # the wheel
        until(d, lambda: d.find_element(By.ID, 'pos').text == f"frame 3/{n}")
        ActionChains(d).key_down(Keys.SHIFT).send_keys('2').key_up(Keys.SHIFT).perform()
        study = names[ids[21]][2]
        want |= {('study', study, 'alice', 'nodule')}
        until(d, lambda: label_state(index) == want)
        expected = {i: CLASSES[int(typed[k]) - 1] if k < 19 else 'artefact' if names[i][1] == series else 'nodule' if names[i][2] == study else ''
                    for k, i in enumerate(ids)}
        for page in range(0, len(ids), 8):                             # every badge is what the index holds
            d.get(url + '/?state=all' + (f'&after={ids[page - 1]}' if page else ''))
            shown = {int(t.get_attribute('data-id')): t.find_element(By.CSS_SELECTOR, '.badges').text for t in d.find_elements(By.CSS_SELECTOR, '.tile')}
            assert shown == {i: expected[i] for i in ids[page:page + 8]}
    assert label_state(index) == want


def test_two_annotators_at_once(index):
    "Alice and Bob, each with a browser and a server on the same index, label the same images at the same time: both kept."
    names = image_ids(index)
    with label_server(index, 'alice') as (a_url, _), label_server(index, 'bob') as (b_url, _), chromium() as a, chromium() as b:
        for d, url in ((a, a_url), (b, b_url)): d.get(url + '/?token=T')
        typists = [threading.Thread(target=keys, args=(d, k * 10)) for d, k in ((a, '1'), (b, '2'))]
        for t in typists: t.start()
        for t in typists: t.join()
        until(a, lambda: n_done(a) >= 10 and n_done(b) >= 10)
        ids = sorted(names)[:10]
        want = {('image', names[i][0], 'alice', 'normal') for i in ids} | {('image', names[i][0], 'bob', 'nodule') for i in ids}
        until(a, lambda: label_state(index) == want)
        a.get(a_url + '/?state=all')
        assert a.find_element(By.ID, f't{ids[0]}').find_element(By.CSS_SELECTOR, '.badges').text.split() == ['normal', '+1']   # Bob's, counted


def test_keys_across_a_page_edge_never_land_on_the_old_page(index):
    "Regression: a key typed while the next page loaded labelled the old page's last tile again (its focus had not moved yet)."
    names = image_ids(index)
    ids = sorted(names)
    with label_server(index, 'alice', 'T', '--per-page', '4') as (url, _), chromium() as d:
        d.get(url + '/?token=T')
        keys(d, '12123')                                               # the fifth key is typed as the second page loads
        until(d, lambda: focused(d) in ids[4:6])
    history = query(index, 'select key, count(*) from labels group by key')
    assert dict(history)[names[ids[3]][0]] == 1                        # the fourth image labelled once: nodule, never relabelled
    assert label_state(index) >= {('image', names[ids[3]][0], 'alice', 'nodule')}
    assert {k for k, _ in history} <= {names[i][0] for i in ids[:5]}


def test_undo_in_one_tab_leaves_another_tabs_labels(index):
    "Two tabs on one server: `u` in one undoes its own last label, never the one the other tab typed after it."
    names = image_ids(index)
    ids = sorted(names)
    with label_server(index, 'alice') as (url, _), chromium() as a, chromium() as b:
        for d in (a, b): d.get(url + '/?token=T')
        keys(a, '1')
        until(a, lambda: label_state(index) == {('image', names[ids[0]][0], 'alice', 'normal')})
        keys(b, Keys.ARROW_RIGHT, Keys.ARROW_RIGHT, '2')                # b had ids[0] in focus: two to the right
        until(b, lambda: len(label_state(index)) == 2)
        a.execute_script('window.before_undo = 1'); keys(a, 'u')
        until(a, lambda: label_state(index) == {('image', names[ids[2]][0], 'alice', 'nodule')})
        until(a, lambda: a.execute_script('return document.readyState === "complete" && window.before_undo === undefined'))   # the page shows it
        keys(a, 'u')                                                   # nothing more typed in a: b's label stays
        until(a, lambda: 'nothing to undo' in a.find_element(By.ID, 'toast').text)
        keys(b, '3', 'u')                                              # typed at once: the undo waits for the label it undoes
        until(b, lambda: len(json.loads(b.execute_script('return sessionStorage.getItem("typed")'))) == 1 and len(label_state(index)) == 1)
    assert label_state(index) == {('image', names[ids[2]][0], 'alice', 'nodule')}
