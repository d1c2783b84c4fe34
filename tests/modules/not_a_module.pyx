# A Python extension that is not an mpop3 module: no declarations.
def hello():
    return "hello"
