import pytest

from autofit.units import GiB, MiB, TiB, fmt_bytes, fmt_share, parse_size


@pytest.mark.parametrize("text,expected", [
    ("2GiB", 2 * GiB),
    ("1.5G", 3 * GiB // 2),       # bare G is binary, like nvidia-smi
    ("512MiB", 512 * MiB),
    ("512 mib", 512 * MiB),       # case and a space do not matter
    ("2GB", 2_000_000_000),       # GB is decimal
    ("10KB", 10_000),
    ("4K", 4096),
    ("4096", 4096),
    ("4096B", 4096),
    (" 1T ", 1024**4),
    (".5G", GiB // 2),
    (123, 123),
])
def test_parse_size(text, expected):
    assert parse_size(text) == expected


@pytest.mark.parametrize("text", ["", "abc", "2 GiBs", "1.2.3G", "G", "0", "0GiB", "-2GiB", "-1", "nan", "2 XB", True, -5])
def test_parse_size_rejects_junk_zero_negative(text):
    with pytest.raises(ValueError):
        parse_size(text)


def test_parse_size_messages_are_clear():
    with pytest.raises(ValueError, match="positive"):
        parse_size("-2GiB")
    with pytest.raises(ValueError, match="unknown size unit 'XB'"):
        parse_size("2XB")


@pytest.mark.parametrize("n,text", [
    (16 * 1024 * 50304 * 2, "1.54 GiB"),   # the logits buffer from the design doc
    (512 * MiB, "512.0 MiB"),
    (2 * GiB, "2.00 GiB"),
    (3 * 1024, "3.0 KiB"),
    (12, "12 B"),
    (0, "0 B"),
    (-512 * MiB, "-512.0 MiB"),
    (1000 * TiB, "1000.00 TiB"),  # under 1 PiB: TiB, as before
    # beyond any machine (r8: a typo'd AUTOFIT_RANK_BUDGETS entry printed '100000000000000000000.00 TiB')
    (2**50, "1.00 PiB"),
    (5000 * TiB, "4.88 PiB"),
    (3 * 2**60, "3.00 EiB"),
    (10**20, "86.74 EiB"),
    (2**70, "1.18e+21 B"),
    (parse_size("99999999999999999999TiB"), "1.10e+32 B"),
    (1e30, "1.00e+30 B"),
    (-(2**51), "-2.00 PiB"),
])
def test_fmt_bytes(n, text):
    assert fmt_bytes(n) == text


@pytest.mark.parametrize("x, text", [(0.1, "10%"), (0.0, "0%"), (0.125, "12.5%"), (0.999, "99.9%"), (0.05, "5%"),
                                     (0.9999999, "99.99999%"), (1e-7, "0.00001%"), (1.0, "100%")])
def test_fmt_share_keeps_the_digits_a_share_needs(x, text):
    """t4 (session 13): --margin 0.999 printed 'less the 100% safety margin'."""
    assert fmt_share(x) == text


def test_a_bare_number_under_1_mib_is_taken_for_a_missing_unit():
    """t11's L5: `--budget 2` was read as 2 bytes and ended eight lines later in 'a larger --budget
    would help'. A bare number under 1 MiB is a missing unit; a unit (B included) or 1 MiB and more
    stays what it says."""
    from autofit.units import missing_unit
    assert missing_unit("2") == "2 is 2 bytes: give a unit, e.g. 2GiB (or 2B for bytes)"
    assert missing_unit(" 256 ") == "256 is 256 bytes: give a unit, e.g. 256MiB (or 256B for bytes)"
    assert missing_unit("1") == "1 is 1 byte: give a unit, e.g. 1GiB (or 1B for bytes)"
    assert missing_unit(str(MiB - 1)).startswith("1048575 is 1,048,575 bytes")
    for said in ("2B", "2GiB", "512 KiB", "1.5G", str(MiB), "4194304"):
        assert missing_unit(said) is None, said


def test_cli_refuses_a_budget_without_a_unit_before_any_work(tmp_path, monkeypatch, capsys):
    from cli_run import cli
    monkeypatch.chdir(tmp_path)
    for cmd in (["probe", "--device", "cpu", "--preset", "tiny"], ["run", "--device", "cpu", "--preset", "tiny"]):
        code, out, err = cli(monkeypatch, capsys, *cmd, "--budget", "2")
        assert code == 2 and out == "" and err == "autofit: error: --budget 2 is 2 bytes: give a unit, e.g. 2GiB " \
                                                 "(or 2B for bytes)\n", err
    assert list(tmp_path.iterdir()) == []  # no --out made
