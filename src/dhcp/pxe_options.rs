//! PXE option codecs (in progress).
