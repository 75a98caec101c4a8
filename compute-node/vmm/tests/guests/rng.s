# Minimal virtio-rng driver over virtio-pci (device 00:01.0, BAR0 at
# 0xc0000000 as assigned by the VMM). Asks for 16 random bytes into
# BUF; prints "V1\n" if the device returned 16 non-zero-looking bytes,
# "V0\n" otherwise, then "N1\n"/"N0\n" for whether the device status has
# DEVICE_NEEDS_RESET set, then powers off.
.code32
.set BAR, 0xc0000000
.set DESC, 0x200000
.set AVAIL, 0x201000
.set USED, 0x202000
.ifndef BUF
.set BUF, 0x203000
.endif
start:
  # Enable memory decoding and bus mastering for 00:01.0.
  mov $0xcf8, %dx
  mov $0x80000804, %eax
  out %eax, %dx
  mov $0xcfc, %dx
  mov $0x0006, %ax
  out %ax, %dx
  # Clear the rings and buffer.
  mov $DESC, %edi
  xor %eax, %eax
  mov $0x4000, %ecx
  rep stosb
  # Reset, ACK, DRIVER.
  movb $0, BAR+0x14
  movb $1, BAR+0x14
  movb $3, BAR+0x14
  # VERSION_1 (feature bit 32).
  movl $1, BAR+0x08
  movl $1, BAR+0x0c
  movb $0xb, BAR+0x14
  # Queue 0: 8 entries.
  movw $0, BAR+0x16
  movw $8, BAR+0x18
  movl $DESC, BAR+0x20
  movl $0, BAR+0x24
  movl $AVAIL, BAR+0x28
  movl $0, BAR+0x2c
  movl $USED, BAR+0x30
  movl $0, BAR+0x34
  movw $1, BAR+0x1c
  movb $0xf, BAR+0x14
  # One writable 16-byte buffer.
  movl $BUF, DESC
  movl $0, DESC+4
  movl $16, DESC+8
  movw $2, DESC+12
  movw $0, DESC+14
  movw $0, AVAIL+4
  movw $1, AVAIL+2
  # Notify queue 0.
  movw $0, BAR+0x3000
  mov $0x00010000, %ecx
wait:
  cmpw $1, USED+2
  je done
  dec %ecx
  jnz wait
  mov $'0', %bl
  jmp report
done:
  mov $'0', %bl
  cmpl $16, USED+8
  jne report
  mov BUF, %eax
  or BUF+4, %eax
  or BUF+8, %eax
  or BUF+12, %eax
  test %eax, %eax
  jz report
  mov $'1', %bl
report:
  mov $0x3f8, %dx
  mov $'V', %al
  out %al, %dx
  mov %bl, %al
  out %al, %dx
  mov $'\n', %al
  out %al, %dx
  mov $'N', %al
  out %al, %dx
  mov $'0', %al
  testb $0x40, BAR+0x14
  jz 3f
  mov $'1', %al
3:
  out %al, %dx
  mov $'\n', %al
  out %al, %dx
  mov $0x600, %dx
  mov $0x34, %al
  out %al, %dx
1: hlt
  jmp 1b
