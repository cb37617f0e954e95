import pytest

from host.errors import TopupError
from host.money import format_pence, parse_pence
from host.registry import format_eui64, parse_eui64, parse_public_key


@pytest.mark.parametrize("text,pence", [
    ("10", 1000), ("10.5", 1050), ("10.50", 1050), ("£10.50", 1050), (" £ 10.50 ", 1050),
    ("0.01", 1), ("50p", 50), ("1,234.56", 123456), ("10000", 1000000), ("GBP5", 500),
])
def test_parses_exact_pence(text, pence):
    assert parse_pence(text) == pence


@pytest.mark.parametrize("text,words", [
    ("-1", "must be positive"), ("0", "at least 1p"), ("0.00", "at least 1p"),
    ("1.234", "more than two decimal places"), ("1e9", "not an amount"),
    ("abc", "not an amount"), ("", "not an amount"), ("1,23", "not an amount"),
    ("10000.01", "over the protocol maximum of £10,000.00"), ("NaN", "not an amount"),
    ("inf", "not an amount"), ("01", "not an amount"), ("9" * 5000, "far too large"),
    ("١٠", "not an amount"),  # Arabic-Indic digits are not accepted
])
def test_rejects_bad_amounts_clearly(text, words):
    with pytest.raises(TopupError) as e:
        parse_pence(text)
    assert words in str(e.value)
    assert "\n" not in str(e.value)


def test_device_maximum_names_the_limit():
    with pytest.raises(TopupError, match="over device X's maximum of £5.00"):
        parse_pence("5.01", maximum=500, limit_name="device X's maximum")


def test_format_pence():
    assert format_pence(1050) == "£10.50"
    assert format_pence(1) == "£0.01"
    assert format_pence(100000000) == "£1,000,000.00"
    assert format_pence(-5) == "-£0.05"


@pytest.mark.parametrize("text", ["00-11-22-33-44-55-66-77", "00:11:22:33:44:55:66:77",
                                  "0011223344556677", "00-11-22-33-44-55-66-77 ".upper()])
def test_eui64_forms(text):
    assert parse_eui64(text) == bytes.fromhex("0011223344556677")
    assert format_eui64(parse_eui64(text)) == "00-11-22-33-44-55-66-77"


def test_eui64_lower_and_upper_case_display_canonically():
    assert format_eui64(parse_eui64("aa:bb:cc:dd:ee:ff:00:11")) == "AA-BB-CC-DD-EE-FF-00-11"


@pytest.mark.parametrize("text", ["00-11-22-33-44-55-66", "00-11:22-33-44-55-66-77",
                                  "001122334455667", "00112233445566778", "zz" * 8, ""])
def test_eui64_rejects(text):
    with pytest.raises(TopupError, match="not an EUI-64"):
        parse_eui64(text)


def test_public_key_hex():
    assert parse_public_key("ab" * 32) == b"\xab" * 32
    with pytest.raises(TopupError):
        parse_public_key("ab" * 31)


def test_balances_in_pounds_and_pence_with_the_sub_penny_remainder_apart():
    from host.money import format_mp
    assert format_mp(12_500_000) == "£125.00"
    assert format_mp(1_249_999) == "£12.49 + 0.999p"
    assert format_mp(23_799_898) == "£237.99 + 0.898p"
    assert format_mp(-1500) == "-£0.01 - 0.5p"
    assert format_mp(-500) == "-0.5p" and format_mp(5) == "0.005p" and format_mp(0) == "£0.00"
    assert format_mp(123_456_789_012) == "£1,234,567.89 + 0.012p"


def test_reserved_eui64s():
    import pytest
    from host.errors import TopupError
    for text in ("00-00-00-00-00-00-00-00", "ff:ff:ff:ff:ff:ff:ff:ff", "FFFFFFFFFFFFFFFF"):
        with pytest.raises(TopupError, match="not a meter's EUI-64"):
            parse_eui64(text)
