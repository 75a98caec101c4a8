# Prints "W\n", then polls the power button port 0x602; when it reads 1,
# prints "B\n" and powers off. Also echoes serial input back.
.code32
start:
  mov $0x3f8, %dx
  mov $'W', %al
  out %al, %dx
  mov $'\n', %al
  out %al, %dx
poll:
  mov $0x3fd, %dx
  in %dx, %al
  test $1, %al
  jz 2f
  mov $0x3f8, %dx
  in %dx, %al
  out %al, %dx
2:
  mov $0x602, %dx
  in %dx, %al
  test $1, %al
  jz poll
  mov $0x3f8, %dx
  mov $'B', %al
  out %al, %dx
  mov $'\n', %al
  out %al, %dx
  mov $0x600, %dx
  mov $0x34, %al
  out %al, %dx
1: hlt
  jmp 1b
