"""GLUE readers on small files in the official layouts, and the WordPiece tokenizer."""

import contextlib

import numpy as np
import pytest

from binax.data import DataFormatError, DatasetNotFoundError, glue, text

T = "\t"

# (folder, file, content, expected text_a, text_b, labels); contents follow GLUE's files.
FILES = {
    "cola": (
        "CoLA",
        "train.tsv",
        "gj04\t1\t\tOur friends won't buy this analysis.\ngj04\t0\t*\tThey drank the pub.\n",
        ["Our friends won't buy this analysis.", "They drank the pub."],
        None,
        [1, 0],
    ),
    "sst2": (
        "SST-2",
        "dev.tsv",
        "sentence\tlabel\n"
        'it \'s a charming and "often" affecting journey . \t1\nunflinchingly bleak\t0\n',
        ['it \'s a charming and "often" affecting journey . ', "unflinchingly bleak"],
        None,
        [1, 0],
    ),
    "mrpc": (
        "MRPC",
        "train.tsv",
        "Quality\t#1 ID\t#2 ID\t#1 String\t#2 String\n"
        "1\t702876\t702977\tAmrozi accused his brother.\tReferring to him, Amrozi accused.\n"
        "0\t2108705\t2108831\tYucaipa owned Dominick 's.\tYucaipa bought Dominick 's.\n",
        ["Amrozi accused his brother.", "Yucaipa owned Dominick 's."],
        ["Referring to him, Amrozi accused.", "Yucaipa bought Dominick 's."],
        [1, 0],
    ),
    "qqp": (
        "QQP",
        "train.tsv",
        "id\tqid1\tqid2\tquestion1\tquestion2\tis_duplicate\n"
        "133273\t213221\t213222\tHow is the life of a math student?\tWhat is math life like?\t0\n"
        "201841\t303345\t303346\tHow do I control my anger?\n"  # a malformed row, as in QQP
        "402555\t536040\t536041\tHow do I learn Python?\tHow can I learn Python?\t1\n",
        ["How is the life of a math student?", "How do I learn Python?"],
        ["What is math life like?", "How can I learn Python?"],
        [0, 1],
    ),
    "stsb": (
        "STS-B",
        "dev.tsv",
        "index\tgenre\tfilename\tyear\told_index\tsource1\tsource2\tsentence1\tsentence2\tscore\n"
        "0\tmain-captions\tMSRvid\t2012test\t0000\tnone\tnone\tA man with a hard hat is dancing."
        "\tA man wearing a hard hat is dancing.\t5.000\n"
        "1\tmain-captions\tMSRvid\t2012test\t0002\tnone\tnone\tA young child is riding a horse."
        "\tA child is riding a horse.\t4.750\n",
        ["A man with a hard hat is dancing.", "A young child is riding a horse."],
        ["A man wearing a hard hat is dancing.", "A child is riding a horse."],
        [5.0, 4.75],
    ),
    "mnli": (
        "MNLI",
        "dev_matched.tsv",
        T.join(
            ["index", "promptID", "pairID", "genre", "sentence1_binary_parse"]
            + ["sentence2_binary_parse", "sentence1_parse", "sentence2_parse", "sentence1"]
            + ["sentence2", "label1", "label2", "label3", "label4", "label5", "gold_label"]
        )
        + "\n"
        + T.join(["0", "63735", "63735n", "slate", "( ( The new ) ...", "( ( The ) ...", "(ROOT)"])
        + T.join(["", "(ROOT)", "The new rights are nice enough", "Everyone really likes them"])
        + T.join(["", "neutral", "entailment", "neutral", "neutral", "neutral", "neutral"])
        + "\n"
        + T.join(["1", "91383", "91383c", "government", "( This ...", "( ( Sente ...", "(ROOT)"])
        + T.join(["", "(ROOT)", "This site includes a list", "The Government Executive"])
        + T.join(["", "contradiction", "contradiction", "", "", "", "contradiction"])
        + "\n",
        ["The new rights are nice enough", "This site includes a list"],
        ["Everyone really likes them", "The Government Executive"],
        [2, 0],
    ),
    "qnli": (
        "QNLI",
        "train.tsv",
        "index\tquestion\tsentence\tlabel\n"
        "0\tWhen did the third Digimon series begin?\tUnlike the two seasons before it.\t"
        "not_entailment\n"
        "1\tWhich missile batteries often have individual launchers?\tThey often have"
        " launchers.\tentailment\n",
        [
            "When did the third Digimon series begin?",
            "Which missile batteries often have individual launchers?",
        ],
        ["Unlike the two seasons before it.", "They often have launchers."],
        [1, 0],
    ),
    "rte": (
        "RTE",
        "train.tsv",
        "index\tsentence1\tsentence2\tlabel\n"
        "0\tNo Weapons of Mass Destruction Found in Iraq Yet.\tWeapons Found in Iraq.\t"
        "not_entailment\n"
        "1\tA place of sorrow, after Pope John Paul II died.\tPope died.\tentailment\n",
        [
            "No Weapons of Mass Destruction Found in Iraq Yet.",
            "A place of sorrow, after Pope John Paul II died.",
        ],
        ["Weapons Found in Iraq.", "Pope died."],
        [1, 0],
    ),
}


def write(tmp_path, folder, name, content):
    d = tmp_path / folder
    d.mkdir(exist_ok=True)
    (d / name).write_text(content, encoding="utf-8")
    return d / name


@pytest.mark.parametrize("task", list(FILES))
def test_read_official_layouts(tmp_path, task):
    folder, name, content, text_a, text_b, labels = FILES[task]
    write(tmp_path, folder, name, content)
    split = name[: -len(".tsv")]
    warns = (
        pytest.warns(UserWarning, match="skipped 1 row.*line 3")
        if task == "qqp"
        else contextlib.nullcontext()
    )
    with warns:
        ex = glue.read_glue(task, split, tmp_path)
    assert ex.text_a == text_a
    assert ex.text_b == text_b
    if task == "stsb":
        assert ex.labels.dtype == np.float32
        np.testing.assert_array_equal(ex.labels, labels)
    else:
        assert ex.labels.dtype == np.int64
        assert ex.labels.tolist() == labels
    assert ex.skipped == (1 if task == "qqp" else 0)
    # The task's own folder works as the data directory too.
    with warns if task != "qqp" else pytest.warns(UserWarning):
        assert glue.read_glue(task.upper(), split, tmp_path / folder).text_a == text_a


def test_test_files_have_no_labels(tmp_path):
    write(tmp_path, "SST-2", "test.tsv", "index\tsentence\n0\tuneasy mishmash of styles\n")
    write(tmp_path, "CoLA", "test.tsv", "index\tsentence\n0\tBill whistled past the house.\n")
    write(
        tmp_path,
        "MRPC",
        "test.tsv",
        "index\t#1 ID\t#2 ID\t#1 String\t#2 String\n0\t1\t2\tPCCW 's chief.\tCurrent Chief.\n",
    )
    sst = glue.read_glue("sst-2", "test", tmp_path)
    assert sst.text_a == ["uneasy mishmash of styles"] and sst.labels is None
    assert glue.read_glue("cola", "test", tmp_path).text_a == ["Bill whistled past the house."]
    mrpc = glue.read_glue("mrpc", "test", tmp_path)
    assert (mrpc.text_a, mrpc.text_b, mrpc.labels) == (["PCCW 's chief."], ["Current Chief."], None)


def test_errors_name_file_line_and_expectation(tmp_path):
    path = write(tmp_path, "RTE", "dev.tsv", "index\tsentence1\tsentence2\tlabel\n0\ta\tb\tyes\n")
    with pytest.raises(DataFormatError, match=r"dev.tsv, line 2: unknown RTE label 'yes'"):
        glue.read_glue("rte", "dev", tmp_path)
    write(tmp_path, "SST-2", "train.tsv", "text\tlabel\nfine\t1\n")
    with pytest.raises(DataFormatError, match=r"lacks the column\(s\) \['sentence'\]"):
        glue.read_glue("sst2", "train", tmp_path)
    write(tmp_path, "STS-B", "train.tsv", FILES["stsb"][2].replace("5.000", "five"))
    with pytest.raises(DataFormatError, match="line 2: the 'score' of STS-B must be a number"):
        glue.read_glue("stsb", "train", tmp_path)
    with pytest.raises(DatasetNotFoundError, match="does not download GLUE.*QNLI/train.tsv"):
        glue.read_glue("qnli", "train", tmp_path)
    with pytest.raises(ValueError, match="unknown GLUE task 'sst'.*cola, sst2"):
        glue.read_glue("sst", "train", tmp_path)
    with pytest.raises(ValueError, match="MNLI has the splits train, dev_matched"):
        glue.read_glue("mnli", "dev", tmp_path)
    assert path.exists()
    assert glue.glue_task("sts-b").num_classes == 1 and glue.glue_task("MNLI").num_classes == 3


def test_wordpiece_tokenizer_trained_on_the_train_split(tmp_path):
    # tokenizers is in the test extra (and binax[text]): no skip.
    folder, name, content, *_ = FILES["mrpc"]
    write(tmp_path, folder, name, content)
    ex = glue.read_glue("mrpc", "train", tmp_path)
    tok = text.train_wordpiece(ex.text_a + ex.text_b, vocab_size=200, min_frequency=1)
    assert [tok.token_to_id(t) for t in text.SPECIAL_TOKENS] == [0, 1, 2, 3, 4]
    enc = text.encode(tok, ex.text_a, ex.text_b, max_length=24)
    assert enc.input_ids.shape == enc.token_type_ids.shape == enc.attention_mask.shape == (2, 24)
    ids, types, mask = (np.asarray(a[0]) for a in enc)
    n = int(mask.sum())
    assert ids[0] == tok.token_to_id("[CLS]") and ids[n - 1] == tok.token_to_id("[SEP]")
    assert np.all(ids[n:] == 0) and np.all(mask[n:] == 0)  # [PAD] is 0, as BinaryEncoder's pad_id
    first_sep = list(ids).index(tok.token_to_id("[SEP]"))
    assert np.all(types[: first_sep + 1] == 0) and np.all(types[first_sep + 1 : n] == 1)
    # Lower-cased words of the training text are in the vocabulary; unseen ones fall back to
    # pieces or [UNK], never to an error.
    assert tok.encode("amrozi accused").tokens == ["[CLS]", "amrozi", "accused", "[SEP]"]
    short = text.encode(tok, ex.text_a, ex.text_b, max_length=8)
    assert short.attention_mask.sum(1).tolist() == [8, 8]  # truncated to max_length
    # Save and load.
    tok.save(str(tmp_path / "tok.json"))
    again = text.load_tokenizer(tmp_path / "tok.json")
    np.testing.assert_array_equal(
        text.encode(again, ex.text_a, ex.text_b, max_length=24).input_ids, enc.input_ids
    )
    # A vocab.txt works as well.
    vocab = tmp_path / "vocab.txt"
    vocab.write_text("\n".join([*text.SPECIAL_TOKENS, "amr", "##ozi", "accused"]) + "\n")
    bert = text.wordpiece_from_vocab(vocab)
    assert bert.encode("Amrozi accused").tokens == ["[CLS]", "amr", "##ozi", "accused", "[SEP]"]
    with pytest.raises(ValueError, match="vocab_size must exceed the 5 special tokens"):
        text.train_wordpiece(["a"], vocab_size=5)
    with pytest.raises(ValueError, match="text_b has 1 texts but text_a has 2"):
        text.encode(tok, ex.text_a, ex.text_b[:1])


def test_glue_metrics_from_a_confusion_matrix():
    # 10 examples: TN 4, FP 1, FN 2, TP 3 (rows: true class, columns: predicted).
    confusion = np.array([[4, 1], [2, 3]])
    assert glue.glue_metrics("mrpc", confusion) == {"f1": pytest.approx(6 / 9)}
    assert glue.glue_metrics("QQP", confusion) == {"f1": pytest.approx(6 / 9)}
    mcc = (3 * 4 - 1 * 2) / np.sqrt(4 * 5 * 5 * 6)
    assert glue.glue_metrics("cola", confusion) == {"mcc": pytest.approx(mcc)}
    assert glue.glue_metrics("sst2", confusion) == {}
    # A constant predictor: Matthews correlation 0 (not NaN), F1 0 without positives.
    assert glue.glue_metrics("cola", np.array([[5, 0], [5, 0]])) == {"mcc": 0.0}
    assert glue.glue_metrics("mrpc", np.array([[5, 0], [0, 0]])) == {"f1": 0.0}
