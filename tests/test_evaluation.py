import numpy as np
import pytest

from smoothcert.evaluation.tables import (average_certified_radius, average_radius_improvement, certified_accuracy, load_results, report)

CLASSIC = """idx\tlabel\tpredict\tradius\tcorrect\ttime
0\t7\t7\t0.812\t1\t0:00:01.234567
1\t2\t2\t0.100\t1\t0:00:01.5
2\t1\t3\t0.500\t0\t0:00:01.2
3\t0\t-1\t0.0\t0\t0:01:00.0
"""


def test_reads_the_reference_code_logs(tmp_path):
    path = tmp_path / "classic.tsv"
    path.write_text(CLASSIC)
    res = load_results(path)
    assert len(res) == 4
    assert res.seconds[0] == pytest.approx(1.234567) and res.seconds[3] == pytest.approx(60.0)
    assert certified_accuracy(res.radius, res.correct, [0.0, 0.5, 0.9]).tolist() == [0.5, 0.25, 0.0]
    # ACR counts wrong and abstained inputs as 0
    assert average_certified_radius(res.radius, res.correct) == pytest.approx((0.812 + 0.1) / 4)
    text = report([path], radii=[0, 0.5])
    assert "| classic | 4 | 0.500 | 0.250 | 0.228 | 0.500 | 0.250 |" in text


def test_certified_accuracy_against_brute_force():
    rng = np.random.default_rng(0)
    radius = rng.exponential(0.5, 500)
    correct = rng.random(500) < 0.8
    radii = np.linspace(0, 2, 17)
    expected = [sum(1 for r, c in zip(radius, correct) if c and r >= t) / 500 for t in radii]
    assert np.allclose(certified_accuracy(radius, correct, radii), expected)
    # the area under the certified-accuracy curve is the ACR
    grid = np.linspace(0, radius.max() + 1, 200_001)
    area = np.trapezoid(certified_accuracy(radius, correct, grid), grid)
    assert area == pytest.approx(average_certified_radius(radius, correct), abs=1e-3)


def test_report_errors(tmp_path):
    with pytest.raises(FileNotFoundError):
        report([tmp_path / "missing.tsv"])
    bad = tmp_path / "bad.tsv"
    bad.write_text("a\tb\n1\t2\n")
    with pytest.raises(ValueError, match="not a results file"):
        report([bad])
    good = tmp_path / "g.tsv"
    good.write_text(CLASSIC)
    with pytest.raises(ValueError, match="labels"):
        report([good], labels=["a", "b"])


def test_average_radius_improvement_matches_by_index(tmp_path):
    base = tmp_path / "base.tsv"
    base.write_text(CLASSIC)
    # the same inputs in another order, with larger radii on 0 and 1; input 2 is wrong in both
    other = tmp_path / "other.tsv"
    other.write_text("idx\tlabel\tpredict\tradius\tcorrect\ttime\tradius_proxy\n"
                     "1\t2\t2\t0.300\t1\t1.0\t0.5\n0\t7\t7\t0.912\t1\t1.0\t1.0\n2\t1\t1\t0.5\t1\t1.0\t0.6\n")
    a, b = load_results(other), load_results(base)
    assert average_radius_improvement(a, b) == pytest.approx(((0.912 - 0.812) + (0.3 - 0.1)) / 2)
    assert average_radius_improvement(a, b, proxy=True) == pytest.approx(((1.0 - 0.812) + (0.5 - 0.1)) / 2)
    assert "ARI vs base" in report([other], baseline=base)


def test_tables_per_norm_for_first_order_logs(tmp_path):
    path = tmp_path / "fo.tsv"
    path.write_text("idx\tlabel\tpredict\tradius\tcorrect\ttime\tradius_l2_0\tradius_l2_1\tradius_linf_0\tradius_linf_1\n"
                    "0\t1\t1\t0.6\t1\t1.0\t0.5\t0.6\t0.02\t0.03\n"
                    "1\t2\t2\t0.3\t1\t1.0\t0.2\t0.3\tnan\tnan\n"
                    "2\t2\t1\t0.9\t0\t1.0\t0.8\t0.9\t0.05\t0.06\n")
    text = report([path], radii=[0.0, 0.25, 0.55], norm_radii={"linf": [0.025]})
    assert "| fo (zeroth order) | 0.667 | 0.333 | 0.000 | 0.2333 |" in text
    assert "| fo (first order) | 0.667 | 0.667 | 0.333 | 0.3000 |" in text
    assert "| fo (first order) | 0.333 | 0.0100 |" in text  # linf: nan counts as no certificate
