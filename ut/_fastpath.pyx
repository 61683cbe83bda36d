# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
"""Compiled fast path of ut-tunnel: PDU framing, the drop-oldest ring queue, lane picking
and batched UDP system calls.

Same API, same docstrings, same results and same errors as the pure-Python twin
``ut/_purepy.py`` (``tests/test_differential.py`` holds the two to that); read that module's
"theory of operation" first. Use it through ``ut.fastpath``.

One extension module, one source file per concern (as uvloop and msgpack do):

* ``_fp_framing.pxi`` -- ``encode_frame``, ``encode_data``, ``encode_data_seq``, ``Deframer``
* ``_fp_ring.pxi``    -- ``RingQueue``
* ``_fp_reseq.pxi``   -- ``Resequencer``
* ``_fp_picker.pxi``  -- ``LanePicker``, ``flow_key``
* ``_fp_mmsg.pxi``    -- ``recv_batch``, ``recv_batch_with_drops``, ``send_batch``,
  ``HAVE_MMSG``, ``HAVE_GSO``, ``HAVE_RXQ_OVFL``
* ``_fp_tun.pxi``     -- ``tun_read_batch``, ``tun_write_batch``, ``gso_split``,
  ``TUN_READ_HEADROOM``, ``VNET_HDR_LEN``

C-level declarations live in ``_fastpath.pxd`` for other Cython code to ``cimport``.
Hot loops touch no Python object per frame beyond the returned tuple and payload bytes.
"""

cimport cython
from cpython.buffer cimport PyBUF_SIMPLE, PyBuffer_Release, PyObject_GetBuffer
from cpython.bytearray cimport PyByteArray_AS_STRING, PyByteArray_FromStringAndSize
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize, PyBytes_GET_SIZE
from cpython.mem cimport PyMem_Free, PyMem_Malloc, PyMem_Realloc
from cpython.ref cimport Py_DECREF, Py_INCREF, Py_XDECREF, PyObject
from libc.stdint cimport int64_t, uint8_t, uint16_t, uint32_t, uint64_t
from libc.string cimport memcmp, memcpy, memmove, memset

import _socket as _csocket  # the C base class: its ``family`` getter returns a plain int
import socket as _socket

from ut.errors import FrameError

__all__ = [
    "MAGIC",
    "VERSION",
    "TYPE_DATA",
    "TYPE_CTRL",
    "HEADER_LEN",
    "MAX_PAYLOAD",
    "HAVE_MMSG",
    "HAVE_GSO",
    "HAVE_RXQ_OVFL",
    "encode_frame",
    "encode_data",
    "encode_data_seq",
    "pad_frame",
    "FLAG_SEQ",
    "FLAG_PAD",
    "KIND_PAD",
    "SEQ_LEN",
    "Deframer",
    "QueueBudget",
    "RingQueue",
    "Resequencer",
    "LanePicker",
    "flow_key",
    "recv_batch",
    "recv_batch_with_drops",
    "send_batch",
    "FLAG_OFFLOAD",
    "TUN_READ_HEADROOM",
    "VNET_HDR_LEN",
    "gso_split",
    "tun_read_batch",
    "tun_write_batch",
]

MAGIC = b"UT"
VERSION = UT_VERSION
TYPE_DATA = UT_TYPE_DATA
TYPE_CTRL = UT_TYPE_CTRL
HEADER_LEN = UT_HEADER_LEN
MAX_PAYLOAD = UT_MAX_PAYLOAD
FLAG_SEQ = 0x01
SEQ_LEN = 4
FLAG_PAD = 0x02
FLAG_OFFLOAD = 0x04
KIND_PAD = 0x04

cdef enum:
    _SEQ_LEN = 4
    _FLAG_SEQ = 0x01
    _KIND_PAD = 0x04

include "_fp_framing.pxi"
include "_fp_ring.pxi"
include "_fp_reseq.pxi"
include "_fp_picker.pxi"
include "_fp_mmsg.pxi"
include "_fp_tun.pxi"
