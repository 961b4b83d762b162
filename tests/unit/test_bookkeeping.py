from ocibuild.build.merge import merge_changes, parse_stanzas

ID = ("Package", "Architecture")
BASE = "Package: libc6\nArchitecture: amd64\nStatus: install ok installed\n\nPackage: dash\nArchitecture: amd64\n"


def test_side_by_side_layers_keep_each_others_packages() -> None:
    go = BASE + "\nPackage: golang-go\nArchitecture: amd64\nDescription: Go\n more text\n"
    lvm = BASE + "\nPackage: libaio-dev\nArchitecture: amd64\n"
    merged = merge_changes([(None, BASE), (BASE, go), (BASE, lvm)], ID)
    assert set(parse_stanzas(merged, ID)) == {("libc6", "amd64"), ("dash", "amd64"), ("golang-go", "amd64"),
                                              ("libaio-dev", "amd64")}
    assert " more text" in merged


def test_removal_and_upgrade_in_a_layer_survive() -> None:
    upgraded = "Package: libc6\nArchitecture: amd64\nVersion: 2\n"  # dash removed, libc6 replaced
    merged = parse_stanzas(merge_changes([(None, BASE), (BASE, upgraded)], ID), ID)
    assert list(merged) == [("libc6", "amd64")] and "Version: 2" in merged[("libc6", "amd64")]


def test_output_is_deterministic_whatever_the_layer_order_of_independent_additions() -> None:
    a = BASE + "\nPackage: a\nArchitecture: all\n"
    b = BASE + "\nPackage: b\nArchitecture: all\n"
    assert merge_changes([(None, BASE), (BASE, a), (BASE, b)], ID) == merge_changes([(None, BASE), (BASE, b), (BASE, a)], ID)
