# Turns the chat page (IN) into a C file (OUT) defining srv_web_page / srv_web_page_len.
file(READ ${IN} hex HEX)
string(LENGTH "${hex}" n)
math(EXPR len "${n} / 2")
string(REGEX REPLACE "([0-9a-f][0-9a-f])" "0x\\1," bytes "${hex}")
string(REGEX REPLACE "(0x..,0x..,0x..,0x..,0x..,0x..,0x..,0x..,0x..,0x..,0x..,0x..,0x..,0x..,0x..,0x..,)" "\\1\n" bytes "${bytes}")
file(WRITE ${OUT} "/* Generated from server/web/index.html by server/web/embed.cmake. */\n#include <stddef.h>\nconst unsigned char srv_web_page[] = {\n${bytes}0x00};\nconst size_t srv_web_page_len = ${len};\n")
