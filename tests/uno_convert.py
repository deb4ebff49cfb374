#!/usr/bin/env python3
"""One conversion through a UNO socket, as unoconv does it: connect to
HOST:PORT, load IN hidden, store it as PDF to OUT, close. One TCP connection
for the whole conversion. Exit 0 on success; the error on stderr otherwise.

usage: uno_convert.py PORT IN OUT
"""

import os
import sys

import uno
from com.sun.star.beans import PropertyValue


def prop(name, value):
    p = PropertyValue()
    p.Name = name
    p.Value = value
    return p


def main():
    port, src, dst = sys.argv[1], sys.argv[2], sys.argv[3]
    local = uno.getComponentContext()
    resolver = local.ServiceManager.createInstanceWithContext(
        "com.sun.star.bridge.UnoUrlResolver", local)
    ctx = resolver.resolve(
        "uno:socket,host=127.0.0.1,port=%s;urp;StarOffice.ComponentContext" % port)
    desktop = ctx.ServiceManager.createInstanceWithContext("com.sun.star.frame.Desktop", ctx)
    doc = desktop.loadComponentFromURL(uno.systemPathToFileUrl(src), "_blank", 0,
                                       (prop("Hidden", True),))
    if doc is None:
        sys.exit("the office could not load " + src)
    try:
        doc.storeToURL(uno.systemPathToFileUrl(dst), (prop("FilterName", "writer_pdf_Export"),))
    finally:
        doc.close(True)


if __name__ == "__main__":
    main()
    sys.stdout.flush()
    sys.stderr.flush()
    # pyuno's teardown at interpreter exit now and then crashes (SIGSEGV)
    # after a conversion that succeeded: leave without it.
    os._exit(0)
