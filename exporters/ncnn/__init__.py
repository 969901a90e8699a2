"""ncnn: ``lower`` (IR -> ncnn layer records, every ncnn decision), ``write`` (.param/.bin/table text),
``caffe`` (the Caffe prototxt/caffemodel pair for caffe2ncnn), ``export`` (files of one export), ``runtime`` (run in
the ncnn Python runtime), ``cli`` (``deployq export-ncnn``)."""
