"""What ``imgclf predict`` is given is what it predicts: a glob's folders are searched, a CSV's labels score,
an image reached twice is predicted once, and whatever is passed over is said (an attack on each, found by an
audit of the command against the project's rule)."""

import csv
import shutil

import imgclf.data.inputs as inputs
from clitools import run_main
from imgclf.data.scan import scan_csv


def images_of(run, n=4):
    index = run.index()
    return [index.abspath(i) for i in range(n)], index


def predicted_paths(path):
    with open(path, newline="") as fh:
        return [row["path"] for row in csv.DictReader(fh)]


def test_a_glob_searches_the_folders_it_matches(trained_run, tmp_path):
    paths, _ = images_of(trained_run, 3)
    mix = tmp_path / "mix"
    (mix / "sub").mkdir(parents=True)
    shutil.copy(paths[0], mix / "a.png")
    shutil.copy(paths[1], mix / "sub" / "b.png")
    shutil.copy(paths[2], mix / "sub" / "c.png")
    result = run_main("predict", trained_run.path, f"{mix}/*", "--out", tmp_path / "p.csv")
    assert result.returncode == 0, result.stderr
    assert sorted(predicted_paths(tmp_path / "p.csv")) == sorted(str(p) for p in (mix / "a.png", mix / "sub" / "b.png",
                                                                                  mix / "sub" / "c.png"))
    result = run_main("predict", trained_run.path, f"{mix}/**", "--out", tmp_path / "q.csv")  # folders and files
    assert result.returncode == 0 and len(predicted_paths(tmp_path / "q.csv")) == 3  # each once, no warning
    assert "more than once" not in result.stderr


def test_a_csvs_label_column_gives_true_labels_and_its_split_column_is_said_unused(trained_run, tmp_path):
    paths, index = images_of(trained_run, 6)
    listing = tmp_path / "in.csv"
    rows = [[str(p), index.labels[i], "test"] for i, p in enumerate(paths)]
    write_rows(listing, ["path", "label", "split"], rows)
    result = run_main("predict", trained_run.path, listing, "--out", tmp_path / "p.csv")
    assert result.returncode == 0, result.stderr
    assert "true labels from the label column of" in result.stdout and "accuracy" in result.stdout
    assert "the split column is not used: every listed image is predicted" in result.stdout
    with open(tmp_path / "p.csv", newline="") as fh:
        assert [r["true_label"] for r in csv.DictReader(fh)] == [index.labels[i] for i in range(6)]
    rows[2][1] = "zebra"
    write_rows(listing, ["path", "label", "split"], rows)
    result = run_main("predict", trained_run.path, listing, "--out", tmp_path / "q.csv")
    assert result.returncode == 0, result.stderr
    assert "predicted unlabelled: label 'zebra' in" in result.stdout


def test_a_csvs_labels_beside_other_inputs_are_said_unused_and_a_csv_is_read_once(trained_run, tmp_path,
                                                                                      monkeypatch):
    paths, index = images_of(trained_run, 4)
    listing = tmp_path / "in.csv"
    write_rows(listing, ["path", "label"], [[str(p), index.labels[i]] for i, p in enumerate(paths[:3])])
    result = run_main("predict", trained_run.path, listing, paths[3], "--out", tmp_path / "p.csv")
    assert result.returncode == 0, result.stderr
    assert f"predicted unlabelled: the label column of {listing} is used only when every input is a CSV" \
        in result.stdout
    with open(tmp_path / "p.csv", newline="") as fh:
        assert all(not r.get("true_label") for r in csv.DictReader(fh))
    reads = []
    monkeypatch.setattr(inputs, "scan_csv", lambda *a, **k: reads.append(a) or scan_csv(*a, **k))
    preds = trained_run.predict([listing])
    assert len(reads) == 1 and preds.has_labels and preds.label_note.startswith("true labels from the label column")


def test_an_image_reached_twice_is_predicted_once_with_a_warning(trained_run, tmp_path):
    paths, _ = images_of(trained_run, 2)
    result = run_main("predict", trained_run.path, paths[0], paths[1], paths[0], "--out", tmp_path / "p.csv")
    assert result.returncode == 0, result.stderr
    assert predicted_paths(tmp_path / "p.csv") == [str(paths[0]), str(paths[1])]
    assert "1 image(s) reached more than once" in result.stderr


def test_a_folders_linked_sub_folder_and_hidden_image_are_said(trained_run, tmp_path):
    paths, _ = images_of(trained_run, 2)
    folder, outside = tmp_path / "new", tmp_path / "outside"
    folder.mkdir()
    outside.mkdir()
    shutil.copy(paths[0], folder / "a.png")
    shutil.copy(paths[0], folder / ".a copy.png")
    shutil.copy(paths[1], outside / "b.png")
    (folder / "linked").symlink_to(outside)
    result = run_main("predict", trained_run.path, folder, "--out", tmp_path / "p.csv")
    assert result.returncode == 0, result.stderr
    assert predicted_paths(tmp_path / "p.csv") == [str(folder / "a.png")]
    assert "did not follow 1 linked folder(s)" in result.stderr and "skipped 1 hidden image file(s)" in result.stderr


def write_rows(path, header, rows):
    with open(path, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(header)
        writer.writerows(rows)
