"""Fuzzing the DICOM door at two layers: mutated datasets in real C-STOREs, and mutated PDUs on
raw sockets (issue 11; the test is tests/acquire/test_fuzz_layers.py, the long run
scripts/bench_fuzz.py).

Every case is generated from ``random.Random(f"{seed}/{layer}/{index}")`` alone, so any one case
can be rebuilt and replayed by its id (``D123``: dataset layer, ``P45``: PDU layer) without
running the others (``scripts/bench_fuzz.py --replay D123``).

The peer is written on sockets rather than with pynetdicom's requestor: it must send what no
conforming requestor sends (false lengths, context ids, control headers, PDU types), and for the
well-formed C-STOREs of the dataset layer it is about ten times faster (pynetdicom's requestor
and dcmtk leave Nagle's algorithm on and wait for the box's delayed ACK between the command and
the dataset PDUs: ~50 ms per C-STORE).

Modules: :mod:`.elements` (datasets as element records), :mod:`.datasets` (dataset-layer cases),
:mod:`.protocol` (PDUs, command sets, a requestor), :mod:`.pdus` (PDU-layer cases), :mod:`.run`
(running them against a box and watching it), :mod:`.stored` (what the box kept).
"""
